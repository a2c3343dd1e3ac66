"""The summary table: each layer's output shape, parameters, receptive field and
FLOPs (``Sequential.summary``; docs/architecture.md, "Inspection").

Receptive field: a layer with kernel k and stride s seen through the layers
before it, whose outputs are ``jump`` input pixels apart, sees
``rf + (k - 1) * jump`` input pixels, and its outputs are ``jump * s`` apart.
Layers without a kernel keep (rf, jump), except those whose class says
``sees_whole_input`` (Dense, GlobalAvgPool2D): from them on each output sees the
whole input, "all". A nested model is followed through its own layers; through a
Residual or Concat, an output sees what its widest branch sees.
"""

ALL = None  # the receptive field of a layer that sees the whole input


def summary_table(model, input_shape):
    """The text of ``model.summary(input_shape)`` (input_shape without the batch)."""
    shape = (1,) + tuple(input_shape)
    rf, jump = (1, 1), (1, 1)
    rows = []
    total_params = total_flops = 0
    for i, layer in enumerate(model.layers):
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
                     "all" if rf is ALL else f"{rf[0]}x{rf[1]}",
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
    """(rf, jump) after ``layer``: grown for layers with ``kernel_size`` and ``stride``,
    ``ALL`` from a layer that ``sees_whole_input`` on, unchanged otherwise."""
    if rf is ALL or layer.sees_whole_input:
        return ALL, jump
    for inner in getattr(layer, "layers", ()):      # a nested Sequential
        rf, jump = receptive_field_step(inner, rf, jump)
    if hasattr(layer, "branches"):      # Residual, Concat: the widest branch decides
        ends = [receptive_field_step(branch, rf, jump) for branch in layer.branches]
        if any(end_rf is ALL for end_rf, _ in ends):
            return ALL, jump
        widest = tuple(max(sizes) for sizes in zip(*(end_rf for end_rf, _ in ends)))
        return widest, tuple(max(steps) for steps in zip(*(end_jump for _, end_jump in ends)))
    kernel, stride = getattr(layer, "kernel_size", None), getattr(layer, "stride", None)
    if kernel is None or stride is None:
        return rf, jump
    new_rf = tuple(r + (k - 1) * j for r, k, j in zip(rf, kernel, jump))
    new_jump = tuple(j * s for j, s in zip(jump, stride))
    return new_rf, new_jump


def _human(flops):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return str(int(flops))
