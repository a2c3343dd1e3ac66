"""The summary table: each layer's output shape, parameters, receptive field and
FLOPs (``Sequential.summary``; docs/architecture.md, "Inspection")."""
import math

from .layers.base import Container

ALL = None  # the receptive field of a layer that sees the whole input


def summary_table(model, input_shape):
    """The text of ``model.summary(input_shape)`` (input_shape without the batch)."""
    shape = (1,) + tuple(input_shape)
    rf, jump = (1, 1), (1, 1)
    rows, total_params, total_flops = [], 0, 0
    for i, (_, layer) in enumerate(model.named_layers()):
        in_shape = shape
        try:
            shape = layer.output_shape(shape)
        except ValueError as exc:
            raise ValueError(f"summary: layer {i} ({type(layer).__name__}) cannot take input "
                             f"of shape {in_shape[1:]}: {exc}") from exc
        rf, jump = receptive_field_step(layer, rf, jump)
        params, flops = layer.num_parameters(), layer.flops(in_shape)
        total_params += params
        total_flops += flops
        rows.append((f"{i}: {type(layer).__name__}", str(shape[1:]), f"{params:,}",
                     "all" if rf is ALL else "x".join(str(math.ceil(r)) for r in rf),
                     _human(flops) if flops else "-"))
    header = ("Layer", "Output shape", "Params", "Recept. field", "FLOPs/sample")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "-" * len(line(header))
    trainable = sum(p.size for p in model.parameters())
    return "\n".join([f"Input shape: {tuple(input_shape)}", rule, line(header), rule]
                     + [line(r) for r in rows]
                     + [rule, f"Total params: {total_params:,} (trainable: {trainable:,})",
                        f"Total FLOPs per sample (forward): {_human(total_flops)}"])


def receptive_field_step(layer, rf, jump):
    """(rf, jump) after ``layer``, whose input values are ``jump`` input pixels apart and
    each see ``rf``: kernel k, dilation d and stride s give ``rf + (k - 1) * d * jump``
    and ``jump * s``; a ``transposed`` layer (ConvTranspose2D, s outputs per input) gives
    ``rf + floor((k - 1) * d / s) * jump`` and ``jump / s`` (a fraction: the table rounds
    rf up); ``ALL`` from a layer that ``sees_whole_input`` on; unchanged without a kernel. A
    Container's sub-layers compose: one after another, or side by side (``in_parallel``:
    Residual, Concat), where the widest branch decides."""
    if rf is ALL or layer.sees_whole_input:
        return ALL, jump
    if isinstance(layer, Container) and layer.in_parallel:
        rfs, jumps = zip(*(receptive_field_step(branch, rf, jump)
                           for _, branch in layer.named_layers()))
        if ALL in rfs:
            return ALL, jump
        return tuple(map(max, zip(*rfs))), tuple(map(max, zip(*jumps)))
    if isinstance(layer, Container):
        for _, inner in layer.named_layers():
            rf, jump = receptive_field_step(inner, rf, jump)
        return rf, jump
    kernel, stride = getattr(layer, "kernel_size", None), getattr(layer, "stride", None)
    if kernel is None or stride is None:
        return rf, jump
    reach = [(k - 1) * d for k, d in zip(kernel, getattr(layer, "dilation", (1, 1)))]
    up = getattr(layer, "transposed", False)                 # s outputs per input
    return (tuple(r + (e // s if up else e) * j for r, e, s, j in zip(rf, reach, stride, jump)),
            tuple(j / s if up else j * s for j, s in zip(jump, stride)))


def _human(flops):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return str(int(flops))
