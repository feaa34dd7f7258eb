"""Reading the SCAN "precomp" datasets: files.py (where the split files are, and their checks),
tokens.py (captions as word pieces, the token cache), split.py (one split: regions and captions).
The training loader is lib/loader.py, its augmentation lib/augmentation.py."""
from lib.data.files import *  # noqa: F401,F403
from lib.data.files import _layout_hint  # noqa: F401
from lib.data.split import *  # noqa: F401,F403
from lib.data.tokens import *  # noqa: F401,F403
