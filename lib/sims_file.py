"""The results file format of the authors' code: results_<dataset>.npy, np.save of the dict
{'npts': N, 'sims': (N, 5N)}; read without unpickling anything but numbers and arrays."""
import pickle

import numpy as np

from lib.data import npy_header
from lib.errors import UserError
from lib.metrics import check_sims_shape
from lib.writing import atomic_write

def save_sims(path, sims):
    """The authors' results_<dataset>.npy: np.save of the dict {'npts': N, 'sims': (N, 5N)} ((N, N) for
    one caption per image)."""
    sims = np.asarray(sims)
    with atomic_write(path, 'wb', what='similarities') as f:
        np.save(f, {'npts': int(sims.shape[0]), 'sims': sims}, allow_pickle=True)


class _ResultsUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; any other class is refused, so no code in
    the file can run."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
               ('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def load_sims(path):
    """Read a results file written by the authors' code or by save_sims, without unpickling
    anything but numbers and numeric arrays. Plain .npy float matrices are accepted too."""
    try:
        with open(path, 'rb') as f:
            _, dtype = npy_header(f)
            if dtype.hasobject:
                obj = _ResultsUnpickler(f).load()
            else:
                f.seek(0)
                obj = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f'similarity file {path} does not exist')
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, AttributeError, TypeError) as err:
        raise UserError(f'{path} is not a similarity file this project can read safely ({err}); expected '
                        "np.save of {'npts': N, 'sims': float array (N, 5N) or (N, N)} or a plain such .npy") from err
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if isinstance(obj, dict):
        if set(obj) != {'npts', 'sims'} or not isinstance(obj['sims'], np.ndarray):
            raise UserError(f"{path} holds a dict with keys {sorted(map(str, obj))}; expected 'npts' and 'sims'")
        sims, npts = obj['sims'], obj['npts']
        if not isinstance(npts, (int, np.integer)) or sims.ndim != 2 or int(npts) != sims.shape[0]:
            raise UserError(f"{path}: 'npts' ({npts!r}) does not match 'sims' of shape {sims.shape}")
    elif isinstance(obj, np.ndarray):
        sims = obj
    else:
        raise UserError(f'{path} holds a {type(obj).__name__}; expected a similarity matrix')
    if not np.issubdtype(sims.dtype, np.floating):
        raise UserError(f'{path}: similarities are {sims.dtype}; expected floating point')
    check_sims_shape(sims, path)
    return sims
