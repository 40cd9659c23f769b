"""The networks against Table 3, and checkpointing against BatchNorm's statistics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from introvae_dist.models import (
    BatchNorm2d,
    Encoder,
    Generator,
    ResidualBlock,
    set_checkpointing,
    table3_widths,
)

# Table 3 (Appendix B), read row by row: (layer, output shape C x H x W).
TABLE3_ENCODER = [
    ("stem", (16, 1024, 1024)), ("pool0", (16, 512, 512)),
    ("res1", (32, 512, 512)), ("pool1", (32, 256, 256)),
    ("res2", (64, 256, 256)), ("pool2", (64, 128, 128)),
    ("res3", (128, 128, 128)), ("pool3", (128, 64, 64)),
    ("res4", (256, 64, 64)), ("pool4", (256, 32, 32)),
    ("res5", (512, 32, 32)), ("pool5", (512, 16, 16)),
    ("res6", (512, 16, 16)), ("pool6", (512, 8, 8)),
    ("res7", (512, 8, 8)), ("pool7", (512, 4, 4)),
    ("res_bottom", (512, 4, 4)),
]
TABLE3_GENERATOR = [
    ("res_bottom", (512, 4, 4)),
    ("up1", (512, 8, 8)), ("res1", (512, 8, 8)),
    ("up2", (512, 16, 16)), ("res2", (512, 16, 16)),
    ("up3", (512, 32, 32)), ("res3", (256, 32, 32)),
    ("up4", (256, 64, 64)), ("res4", (128, 64, 64)),
    ("up5", (128, 128, 128)), ("res5", (64, 128, 128)),
    ("up6", (64, 256, 256)), ("res6", (32, 256, 256)),
    ("up7", (32, 512, 512)), ("res7", (16, 512, 512)),
    ("up8", (16, 1024, 1024)), ("res_top", (16, 1024, 1024)),
    ("to_rgb", (3, 1024, 1024)),
]
# Residual blocks that Table 3 lists with a 1x1 conv (the width changes there).
ENCODER_1X1 = {"res1", "res2", "res3", "res4", "res5"}
GENERATOR_1X1 = {"res3", "res4", "res5", "res6", "res7"}


def _record_shapes(seq: nn.Sequential) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name, layer in seq.named_children():
        layer.register_forward_hook(lambda _m, _i, out, name=name: shapes.append((name, tuple(out.shape[1:]))))
    return shapes


def test_1024_networks_match_table3_stage_by_stage() -> None:
    torch.manual_seed(0)
    enc = Encoder(1024, 512, table3_widths(1024), checkpointing=False).eval()
    gen = Generator(1024, 512, table3_widths(1024), checkpointing=False).eval()
    enc_shapes, gen_shapes = _record_shapes(enc.features), _record_shapes(gen.features)
    with torch.no_grad():
        mu, logvar = enc(torch.rand(1, 3, 1024, 1024))
        fc_out = gen.fc(mu)
        image = gen(mu)
    assert enc_shapes == TABLE3_ENCODER
    assert enc.fc.out_features == 1024 and mu.shape == logvar.shape == (1, 512)  # FC-1024, split 512/512
    assert fc_out.shape == (1, 8192)  # FC-8192 + ReLU, reshaped to 512 x 4 x 4
    assert gen_shapes == TABLE3_GENERATOR
    assert image.shape == (1, 3, 1024, 1024)
    for net, with_1x1 in ((enc, ENCODER_1X1), (gen, GENERATOR_1X1)):
        for name, layer in net.features.named_children():
            if isinstance(layer, ResidualBlock):
                assert isinstance(layer.shortcut, nn.Conv2d) == (name in with_1x1), name
                if name in with_1x1:
                    assert layer.shortcut.kernel_size == (1, 1)
                assert layer.conv1.kernel_size == layer.conv2.kernel_size == (3, 3)


@pytest.mark.parametrize("resolution_px,stages", [(128, 5), (256, 6), (512, 7)])
def test_smaller_resolutions_drop_the_highest_resolution_stages(resolution_px: int, stages: int) -> None:
    widths = table3_widths(resolution_px)
    assert widths == (16, 32, 64, 128, 256, 512, 512, 512)[8 - stages:]
    enc, gen = Encoder(resolution_px, 8, widths), Generator(resolution_px, 8, widths)
    pools = [n for n, _ in enc.features.named_children() if n.startswith("pool")]
    ups = [n for n, _ in gen.features.named_children() if n.startswith("up")]
    assert len(pools) == len(ups) == stages


def test_small_configurable_networks_round_trip_shapes() -> None:
    enc, gen = Encoder(32, 16, (8, 16, 32), norm="group"), Generator(32, 16, (8, 16, 32), norm="none")
    mu, logvar = enc(torch.rand(2, 3, 32, 32))
    assert mu.shape == logvar.shape == (2, 16) and gen(mu).shape == (2, 3, 32, 32)


def test_wrong_widths_or_resolution_are_rejected() -> None:
    with pytest.raises(ValueError, match="resolution_px=100"):
        Encoder(100, 16, (8, 16))
    with pytest.raises(ValueError, match="widths has 2 entries"):
        Generator(32, 16, (8, 16))


def _block_pair() -> tuple[ResidualBlock, ResidualBlock]:
    torch.manual_seed(0)
    plain = ResidualBlock(4, 8, "batch", checkpointing=False)
    ckpt = ResidualBlock(4, 8, "batch", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def test_checkpointed_block_advances_batchnorm_statistics_once() -> None:
    plain, ckpt = _block_pair()
    x = torch.randn(6, 4, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    plain(x).square().sum().backward()
    ckpt(x2).square().sum().backward()  # the backward re-runs the forward
    for bn_plain, bn_ckpt in ((plain.norm1, ckpt.norm1), (plain.norm2, ckpt.norm2)):
        assert int(bn_ckpt.num_batches_tracked) == 1
        torch.testing.assert_close(bn_ckpt.running_mean, bn_plain.running_mean)
        torch.testing.assert_close(bn_ckpt.running_var, bn_plain.running_var)
    torch.testing.assert_close(x2.grad, x.grad)
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad)


def test_checkpointed_block_used_three_times_in_one_loss() -> None:
    # The encoder sees x, x_r and x_p in one loss: non-reentrant checkpointing must allow it.
    plain, ckpt = _block_pair()
    inputs = [torch.randn(3, 4, 8, 8) for _ in range(3)]
    sum(plain(x).mean() for x in inputs).backward()
    sum(ckpt(x).mean() for x in inputs).backward()
    assert int(ckpt.norm1.num_batches_tracked) == 3
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad)


def test_checkpointing_threshold_recomputes_only_the_large_blocks() -> None:
    # 16 px encoder: res1 sees 8x8, res_bottom 4x4; with min_side_px=8 only res1 is recomputed.
    enc = Encoder(16, 4, (8, 16), "batch", checkpointing=True)
    set_checkpointing(enc, True, min_side_px=8)
    calls = {"res1": 0, "res_bottom": 0}
    for name in calls:
        getattr(enc.features, name).conv1.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    mu, logvar = enc(torch.rand(2, 3, 16, 16))
    (mu.sum() + logvar.sum()).backward()
    assert calls == {"res1": 2, "res_bottom": 1}  # res1 ran again in the backward


def test_checkpointed_generator_graph_serves_two_backward_passes() -> None:
    # algorithm.decode keeps G's graph for a data-only autograd.grad, then G's own backward.
    torch.manual_seed(0)
    plain = Generator(16, 4, (8, 16), "batch", checkpointing=False)
    ckpt = Generator(16, 4, (8, 16), "batch", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    z = torch.randn(3, 4)
    grads = []
    for gen in (plain, ckpt):
        z_leaf = z.clone().requires_grad_(True)
        out = gen(z_leaf)
        (grad_z,) = torch.autograd.grad(out.square().mean(), z_leaf, retain_graph=True)
        out.square().mean().backward()
        grads.append((grad_z, [p.grad for p in gen.parameters()], gen.features.res_top.norm1.num_batches_tracked))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for g_ckpt, g_plain in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(g_ckpt, g_plain)
    assert int(grads[1][2]) == int(grads[0][2]) == 1  # statistics advanced once, recomputation or not


def test_checkpointed_encoder_segments_match_plain_gradients_and_statistics() -> None:
    # Segments recompute block + pooling (and the stem) together; results must not change.
    torch.manual_seed(0)
    plain = Encoder(16, 4, (8, 16), "batch", checkpointing=False)
    ckpt = Encoder(16, 4, (8, 16), "batch", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 16, 16)
    for enc in (plain, ckpt):
        mu, logvar = enc(x)
        (mu.square().sum() + logvar.sum()).backward()
    for p_plain, p_ckpt in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad)
    for b_plain, b_ckpt in zip(plain.buffers(), ckpt.buffers()):
        torch.testing.assert_close(b_ckpt, b_plain)  # running statistics advanced once


def _largest_kept_activation_per_image(run: Callable[[], torch.Tensor], batch: int) -> int:
    """Elements per image of the largest activation kept for the backward outside checkpoints
    (tensors saved inside a checkpoint go to the checkpoint's own hooks, not this one)."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[0] == batch:  # activations, not weights
            sizes.append(t[0].numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run().sum().backward()
    return max(sizes)


def test_segments_keep_no_activation_larger_than_the_image() -> None:
    # What keeps memory down at 1024 px: E's stem and AvgPools, G's Upsamples and to-RGB run
    # inside the checkpoints, so no full-width tensor at the image's side is kept: without
    # them, the stem's output (8 x 16 x 16 here) and to-RGB's input would be.
    batch, image = 5, 3 * 16 * 16
    enc = Encoder(16, 4, (8, 16), "batch", checkpointing=True)
    gen = Generator(16, 4, (8, 16), "batch", checkpointing=True)
    x, z = torch.rand(batch, 3, 16, 16, requires_grad=True), torch.randn(batch, 4)
    assert _largest_kept_activation_per_image(lambda: enc(x)[0], batch) <= image
    assert _largest_kept_activation_per_image(lambda: gen(z), batch) <= image
    set_checkpointing(enc, False)
    set_checkpointing(gen, False)
    assert _largest_kept_activation_per_image(lambda: enc(x)[0], batch) == 8 * 16 * 16  # the control
    assert _largest_kept_activation_per_image(lambda: gen(z), batch) == 8 * 16 * 16


def test_generator_runs_in_the_activation_layout_it_is_given() -> None:
    gen = Generator(16, 4, (8, 16), "batch", checkpointing=False)
    gen.activation_memory_format = torch.channels_last  # train.channels_last
    assert gen(torch.randn(2, 4)).is_contiguous(memory_format=torch.channels_last)


def test_bf16_weights_keep_fp32_running_statistics() -> None:
    # DeepSpeed's bf16 mode casts parameters, not buffers (FIELD-NOTES).
    bn = BatchNorm2d(4)
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    y = bn(torch.randn(5, 4, 3, 3).bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert int(bn.num_batches_tracked) == 1 and bn.running_mean.abs().sum() > 0
