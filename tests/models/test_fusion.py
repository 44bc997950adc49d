"""CrossGranularityFusion.attention_map is the word-patch attention its forward pass actually uses."""
import pytest
import torch

from simcrop import ops
from simcrop.models.fusion import CrossGranularityFusion, word_patch_attention

B, L, N, D, HEADS = 2, 37, 29, 48, 4  # odd sizes, Dh = 12


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(B, L, D, generator=g)
    z = torch.randn(B, N, D, generator=g)
    text_mask = torch.arange(L)[None] < torch.tensor([[L], [23]])  # [B, L]: the second report is padded
    return q0, text_mask, z


def _fusion(seed: int = 0) -> CrossGranularityFusion:
    torch.manual_seed(seed)
    return CrossGranularityFusion(D, HEADS, 2 * D, dropout=0.1).eval()


def test_attention_map_equals_the_softmax_of_the_forward_pass(monkeypatch):
    """Capture the softmax the reference op computes inside forward; attention_map must give the same weights."""
    fusion, (q0, text_mask, z) = _fusion(), _inputs()
    seen = []
    real_softmax = torch.softmax

    def spy(x, *args, **kwargs):
        out = real_softmax(x, *args, **kwargs)
        seen.append(out)
        return out

    with torch.no_grad():
        amap = fusion.attention_map(q0, text_mask, z)
        monkeypatch.setattr(torch, "softmax", spy)
        fusion(q0, text_mask, z, kernels="reference")
        monkeypatch.setattr(torch, "softmax", real_softmax)
    used = [w for w in seen if w.shape == (B, HEADS, L, N)]
    assert len(used) == 1  # the op's word-patch weights (self-attention goes through SDPA)
    assert amap.shape == (B, HEADS, L, N) and amap.dtype == torch.float32
    assert torch.equal(amap, used[0])
    torch.testing.assert_close(amap.sum(-1), torch.ones(B, HEADS, L))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_map_reproduces_the_fused_attention_output(monkeypatch, dtype):
    """The op's output is softmax(q k^T / sqrt(Dh)) v + g at real queries: rebuilt from attention_map and the
    v, g forward fed the op, it matches that output (so the map is the one the layer mixes the values with)."""
    fusion, (q0, text_mask, z) = _fusion(1), _inputs(1)
    fusion, q0, z = fusion.to(dtype), q0.to(dtype), z.to(dtype)
    seen = {}
    real = ops.cross_granularity_attention

    def spy(q, k, v, g, mask, backend="auto"):
        out = real(q, k, v, g, mask, backend=backend)
        seen.update(q=q, k=k, v=v, g=g, out=out)
        return out

    monkeypatch.setattr(ops, "cross_granularity_attention", spy)
    with torch.no_grad():
        fusion(q0, text_mask, z)  # backend "auto", as training runs it
        amap = fusion.attention_map(q0, text_mask, z)  # [B, H, L, N]
    torch.testing.assert_close(amap, word_patch_attention(seen["q"], seen["k"]), rtol=0, atol=0)
    rebuilt = amap.double() @ seen["v"].double() + seen["g"].double()[:, :, None]  # [B, H, L, Dh]
    rebuilt = rebuilt * text_mask[:, None, :, None]
    tol = {torch.float32: 1e-5, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(rebuilt, seen["out"].double(), atol=tol, rtol=tol)


def test_attention_map_follows_the_parameters():
    """Changing a projection the forward uses changes the map (it is not a copy of frozen weights)."""
    fusion, (q0, text_mask, z) = _fusion(2), _inputs(2)
    with torch.no_grad():
        before = fusion.attention_map(q0, text_mask, z)
        fusion.kv.weight.mul_(2.0)
        after = fusion.attention_map(q0, text_mask, z)
    assert not torch.allclose(before, after)
