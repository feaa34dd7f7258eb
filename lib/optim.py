"""The optimizer and learning-rate schedule of a run (the model says how its parameters group)."""
import torch


def build_optimizer(model, args):
    """AdamW over model.parameter_groups and the authors' step decay by epoch. `args`: the run's
    options (learning_rate, bert_lr_factor, graph_lr_factor, weight_decay, lr_schedules, decay_rate)."""
    groups = model.parameter_groups(args.learning_rate, args.bert_lr_factor, args.graph_lr_factor)
    # on CUDA one fused kernel updates every parameter (the default launches several per tensor
    # group); CPU keeps the default implementation, whose results the CPU runs and tests pin
    fused = next(model.parameters()).device.type == 'cuda'
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=fused or None)
    # lr x decay_rate at each epoch of lr_schedules (the scheduler is stepped once per epoch)
    milestones, rate = sorted(args.lr_schedules), args.decay_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: rate ** sum(epoch >= m for m in milestones))
    return optimizer, scheduler
