"""Pictures: sample DropBlock masks at each patched stage, and the schedule curve, as one PNG.

Rendered with Pillow (a torchvision dependency), no plotting library needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageDraw

from dropblock_inject.op.functional import drop_block
from dropblock_inject.pipeline.plan import Plan, Site

__all__ = ["block_label", "render_plan"]

_CELL = 4  # pixels per feature-map unit, at least
_KEPT, _DROPPED, _INK, _PAPER = (235, 235, 235), (200, 40, 40), (20, 20, 20), (255, 255, 255)


def render_plan(
    plan: Plan,
    *,
    channels: int = 16,
    total_steps: int = 100,
    progress: Callable[[int], float] | None = None,
    seed: int = 0,
) -> Image.Image:
    """One picture of a plan: per patched stage, masks of ``channels`` channels drawn per channel
    and shared across channels (red = dropped), then the schedule's drop rate over training.

    Args:
        plan: A plan from :func:`dropblock_inject.plan`.
        channels: Channels drawn per row.
        total_steps: Steps on the schedule's x axis.
        progress: ``step -> progress in [0, 1]`` (default: the paper's linear ramp).
        seed: Seed of the drawn masks.

    Returns:
        A PIL image (save it with ``.save("plan.png")``).

    Example:
        >>> import torchvision, dropblock_inject as dbi
        >>> render_plan(dbi.plan(torchvision.models.resnet18())).size[0] > 0
        True
    """
    generator = torch.Generator().manual_seed(seed)
    panels = [_stage_panel(site, channels, generator) for site in _one_site_per_stage(plan)]
    panels.append(_schedule_panel(plan, total_steps, progress or (lambda s: min(s / total_steps, 1.0))))
    title = f"DropBlock plan for {plan.model} ({len(plan)} sites, gamma={plan.gamma})"
    return _stack([_text_panel(title, max(p.width for p in panels)), *panels])


def _one_site_per_stage(plan: Plan) -> list[Site]:
    seen: dict[int, Site] = {}
    for site in plan:
        seen.setdefault(site.stage, site)
    return list(seen.values())


def _stage_panel(site: Site, channels: int, generator: torch.Generator) -> Image.Image:
    feature = site.feature[-2:]
    shape = (1, channels, *feature)
    block = site.block_size[-2:]
    per_channel = drop_block(torch.ones(shape), site.rate, block, generator=generator)
    shared = drop_block(torch.ones(shape), site.rate, block, shared_channels=True, generator=generator)
    scale = max(_CELL, 48 // max(feature))
    rows = [_mask_row(per_channel[0] == 0, scale), _mask_row(shared[0] == 0, scale)]
    label = (
        f"stage {site.stage}: {'x'.join(map(str, site.feature))} map, block {block_label(site)}, rate {site.rate:.3f} "
        f"(expected drop {site.expected_drop:.3f}); top: per channel, bottom: shared"
    )
    body = _stack(rows, gap=4)
    return _stack([_text_panel(label, max(body.width, 10)), body], gap=2)


def block_label(site: Site) -> str:
    """The block as the op applies it (clipped to the feature map), saying when it was clipped
    and when it covers the whole map (SpatialDropout rather than DropBlock).

    Example:
        >>> import dropblock_inject as dbi, torchvision
        >>> [block_label(s) for s in dbi.plan(torchvision.models.resnet18(), input_size=(3, 64, 64))][-1]
        '2x2 (7x7 clipped; the whole map)'
    """
    block, feature = tuple(site.block_size[-2:]), tuple(site.feature[-2:])
    drawn = tuple(min(b, f) for b, f in zip(block, feature))
    notes = [f"{'x'.join(map(str, block))} clipped"] if drawn != block else []
    notes += ["the whole map"] if drawn == feature else []
    text = "x".join(map(str, drawn))
    return f"{text} ({'; '.join(notes)})" if notes else text


def _mask_row(dropped: torch.Tensor, scale: int) -> Image.Image:
    """``dropped``: ``(C, H, W)`` bool; one tile per channel."""
    c, h, w = dropped.shape
    row = Image.new("RGB", (c * (w * scale + 6), h * scale), _PAPER)
    for i in range(c):
        tile = Image.new("RGB", (w, h), _KEPT)
        pixels = tile.load()
        for y, x in dropped[i].nonzero().tolist():
            pixels[x, y] = _DROPPED
        row.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (i * (w * scale + 6), 0))
    return row


def _schedule_panel(plan: Plan, total_steps: int, progress: Callable[[int], float]) -> Image.Image:
    width, height, pad = 360, 140, 28
    image = Image.new("RGB", (width, height + 2 * pad), _PAPER)
    draw = ImageDraw.Draw(image)
    top = max((s.rate for s in plan), default=0.0) or 1.0
    draw.line([(pad, pad), (pad, pad + height), (width - 8, pad + height)], fill=_INK)
    for rate in sorted({round(s.rate, 6) for s in plan}):
        points = [(pad + (width - pad - 8) * t / total_steps, pad + height * (1 - rate * progress(t) / top))
                  for t in range(total_steps + 1)]  # fmt: skip
        draw.line(points, fill=_DROPPED, width=2)
        draw.text((width - 80, points[-1][1] - 12), f"p={rate:.3f}", fill=_INK)
    draw.text((pad, 4), f"drop rate over {total_steps} steps (schedule)", fill=_INK)
    draw.text((pad, pad + height + 6), "0", fill=_INK)
    draw.text((width - 40, pad + height + 6), str(total_steps), fill=_INK)
    return image


def _text_panel(text: str, width: int) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = int(probe.textlength(text))
    image = Image.new("RGB", (max(width, text_width + 8), 16), _PAPER)
    ImageDraw.Draw(image).text((4, 2), text, fill=_INK)
    return image


def _stack(images: list[Image.Image], gap: int = 10) -> Image.Image:
    width = max(i.width for i in images)
    out = Image.new("RGB", (width, sum(i.height for i in images) + gap * (len(images) - 1)), _PAPER)
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height + gap
    return out
