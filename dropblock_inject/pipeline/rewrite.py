"""Stage 4, rewrite: put a DropBlock at every new site of a plan, verify, or undo everything.

Three ways in, none of which replaces a module or changes a parameter:

* ``hook``: the last module before the activation (a norm, or the convolution) gets a child
  ``dropblock`` and a forward hook that passes its output through it;
* ``slot``: an identity placeholder between norm and activation (timm ResNet's ``drop_block``)
  is replaced by the DropBlock;
* ``fused``: the identity ``.drop`` of timm's fused norm-act module is replaced.

A DropBlock has no parameters and no persistent buffers, so ``state_dict`` keys, the Parameter
objects and their order are unchanged; ``copy.deepcopy``, pickling and ``torch.save`` of the whole
model keep the hooks (the hook is a module-level function).
"""

from __future__ import annotations

from torch import nn

from dropblock_inject.errors import VerificationError
from dropblock_inject.op.module import DropBlock
from dropblock_inject.pipeline.markers import HOSTED_ATTR, REPLACED_ATTR, dropblock_hook, injected_modules
from dropblock_inject.pipeline.plan import Plan, Site

__all__ = ["apply_plan", "injected_modules", "strip_model"]


def apply_plan(model: nn.Module, plan: Plan) -> list[DropBlock]:
    """Insert a DropBlock at every ``"new"`` site of ``plan``; on any failure undo all and re-raise.

    Returns:
        The inserted modules.
    """
    before = _Snapshot(model)
    inserted: list[DropBlock] = []
    done: set[str] = set()
    try:
        for site in plan:
            if site.status != "new" or site.host in done:
                continue
            inserted.append(_insert(model, site, plan))
            done.add(site.host)
        before.verify(model)
    except BaseException:
        strip_model(model, only=inserted)
        raise
    return inserted


def _make_dropblock(site: Site, plan: Plan) -> DropBlock:
    # In place: a site is the fresh output of a norm or convolution on its way to the activation
    # (a hook's return value replaces it for every reader; a slot or fused ``drop`` is reassigned),
    # and neither backward reads that output, so nothing sees the undropped values. It saves an
    # activation-sized allocation per site.
    db = DropBlock(site.drop_prob, site.block_size, gamma_scale=site.gamma_scale, shared_channels=plan.shared_channels,
                   gamma=plan.gamma, inplace=True, channel_dim=site.channel_dim)  # fmt: skip
    db.injected = True
    return db


def _insert(model: nn.Module, site: Site, plan: Plan) -> DropBlock:
    db = _make_dropblock(site, plan)
    if site.kind == "hook":
        host = model.get_submodule(site.host)
        if hasattr(host, HOSTED_ATTR):
            raise VerificationError(f"{site.host} already has an attribute {HOSTED_ATTR!r}; cannot hook it")
        db.train(host.training)  # a model patched in eval mode stays an identity until train()
        host.add_module(HOSTED_ATTR, db)
        host.register_forward_hook(dropblock_hook)
        return db
    parent_path, _, name = site.host.rpartition(".") if site.kind == "slot" else (site.host, "", "drop")
    parent = model.get_submodule(parent_path) if parent_path else model
    replaced = getattr(parent, name)
    db.train(replaced.training)
    object.__setattr__(db, REPLACED_ATTR, replaced)
    setattr(parent, name, db)
    return db


def strip_model(model: nn.Module, only: list[DropBlock] | None = None) -> int:
    """Remove injected DropBlocks (all, or those in ``only``) and their hooks; returns how many."""
    targets = {id(m) for m in (only if only is not None else injected_modules(model))}
    removed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) not in targets:
                continue
            if name == HOSTED_ATTR and _remove_hook(module):
                delattr(module, name)
            else:
                setattr(module, name, child.__dict__.get(REPLACED_ATTR) or nn.Identity())
            removed += 1
    return removed


def _remove_hook(module: nn.Module) -> bool:
    keys = [k for k, hook in module._forward_hooks.items() if hook is dropblock_hook]
    for k in keys:
        del module._forward_hooks[k]
        module._forward_hooks_with_kwargs.pop(k, None)
        module._forward_hooks_always_called.pop(k, None)
    return bool(keys)


class _Snapshot:
    """What a rewrite must not change: state_dict keys and storage, the Parameter objects and order."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        self.params = [id(p) for p in model.parameters()]

    def verify(self, model: nn.Module) -> None:
        state = {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        if state.keys() != self.state.keys():
            added, lost = sorted(state.keys() - self.state.keys()), sorted(self.state.keys() - state.keys())
            raise VerificationError(f"state_dict keys changed (added {added[:5]}, lost {lost[:5]}); model restored")
        changed = [k for k in state if state[k] != self.state[k]]
        if changed:
            raise VerificationError(f"state_dict tensors changed: {changed[:5]}; model restored")
        if [id(p) for p in model.parameters()] != self.params:
            raise VerificationError("the Parameter objects or their order changed; model restored")
