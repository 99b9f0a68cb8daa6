"""What the probes share: a model run over examples in batches, with each batch's LN(module input) per position."""

import torch
import torch.nn.functional as F

from perpcs.training import collate


@torch.no_grad()
def module_inputs(model, examples, positions, pad_id: int, batch_size: int = 16):
    """Yields, per batch of `examples`, (labels, attention mask, {position: LN(h) of the module's input}) from one
    forward of `model` (layer norm without affine, as the keys take it)."""
    modules = {p: model.get_submodule(p) for p in positions}
    for i in range(0, len(examples), batch_size):
        inputs = collate(examples[i : i + batch_size], pad_id)
        labels, seen = inputs.pop("labels"), {}
        handles = [m.register_forward_pre_hook(
            lambda mod, a, p=p: seen.__setitem__(p, F.layer_norm(a[0].float(), (a[0].shape[-1],))))
            for p, m in modules.items()]
        try:
            model(**inputs)
        finally:
            for h in handles:
                h.remove()
        yield labels, inputs["attention_mask"], seen
