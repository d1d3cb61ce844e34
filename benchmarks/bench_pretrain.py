"""Training-step throughput: our MAE (pipeline/models/mae.py) vs a reference-style MAE.

The baseline model is written the way the MAE reference code (models_mae.py of the MAE/FMAE
release) computes it: attention as explicit ``softmax(q @ k^T * scale) @ v`` (the
(N, heads, T, T) matrix is materialised), plain (unfused) AdamW. Its step is the reference
``engine_pretrain.py`` step (``--ref-step reference``, the default): ``torch.cuda.amp.autocast``
(fp16 on CUDA; the reference has no bf16, and on CPU it is a no-op, i.e. fp32), ``loss.item()``,
a GradScaler that unscales and computes the gradient norm every step, then
``torch.cuda.synchronize()``; ``--ref-step plain`` times forward, backward, AdamW only, with
``--ref-amp`` (default: the reference's fp16 on CUDA) for a model-only comparison.
Ours is our loop's step: ``F.scaled_dot_product_attention`` (fused kernels), bf16 autocast
where ``--amp`` (resolved like ``pretrain.amp``) turns it on, the loss read for the NaN check,
fused AdamW.

Both models have the same parameter names, so the baseline is loaded with our weights and the
script first checks that both compute the same loss on the same images and mask (fp32), i.e.
that the two sides do the same work. Then it times forward + backward + optimizer step,
alternating rounds of the two models so that load from other processes hits both alike, and
reports the median images/s per side, their ratio, the achieved TFLOP/s, MFU and on CUDA
the peak memory (``torch.cuda.max_memory_allocated``).

FLOPs (:func:`train_flops_per_image`): matmul FLOPs only, 2 per multiply-add; one training step
= 3x the forward (backward ~ 2x forward), forward = patch embedding on all L patches + encoder
on the 1 + L(1 - mask_ratio) visible tokens + decoder on all 1 + L tokens + prediction head;
a transformer block on T tokens of width d costs 24 T d^2 (qkv, proj, 2 MLP linears with
ratio 4) + 4 T^2 d (q k^T and attn v). ViT-L/16 MAE at 224 px, decoder 512 x 8: 124.5
GFLOP/image. MFU = images/s x FLOPs/image / ``--peak-tflops`` (default on CUDA: 989, the H100
SXM's dense bf16 peak; give the peak of your GPU, e.g. 756 for H100 PCIe, 312 for A100).

    python benchmarks/bench_pretrain.py                          # the CPU default config
    python benchmarks/bench_pretrain.py --device cuda --amp bf16 --model large --img-size 224 \
        --patch 16 --decoder-dim 512 --decoder-depth 8 --decoder-heads 16 --batch 128 \
        --steps 10 --rounds 3 --json bench_pretrain_h100.json    # paper scale, one GPU
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn


from pipeline.io import setup_logging
from pipeline.models.mae import MAE
from pipeline.models.vit import sincos_pos_embed_2d, vit_size
from pipeline.pretrain import param_groups, resolve_amp

log = logging.getLogger("bench_pretrain")
H100_SXM_BF16_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 (no sparsity)


# --------------------------------------------------------------------------- baseline model
class RefAttention(nn.Module):
    """Attention as the reference-era timm wrote it: explicit softmax(q k^T) v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, T, C/heads)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, T, T) materialised
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, C))


class RefMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class RefMAE(nn.Module):
    """MAE as in the reference models_mae.py, same parameter names as ours."""

    def __init__(self, model_size: str, img_size: int, patch_size: int, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int):
        super().__init__()
        s = vit_size(model_size)
        self.p, grid = patch_size, img_size // patch_size
        L = grid * grid
        self.patch_embed = RefPatchEmbed(patch_size, s.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.embed_dim))
        self.pos_embed = nn.Parameter(torch.from_numpy(
            sincos_pos_embed_2d(s.embed_dim, grid))[None], requires_grad=False)
        self.blocks = nn.ModuleList([RefBlock(s.embed_dim, s.num_heads) for _ in range(s.depth)])
        self.norm = nn.LayerNorm(s.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(s.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(
            sincos_pos_embed_2d(decoder_dim, grid))[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([RefBlock(decoder_dim, decoder_heads)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3)
        self.L = L

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        x = self.decoder_embed(self.norm(x))
        m = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], m], 1)
        x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p, h = self.p, imgs.shape[2] // self.p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(N, 3, h, p, h, p)).reshape(N, L, -1)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


# --------------------------------------------------------------------------- measurement
def train_flops_per_image(model_size: str, img: int, patch: int, dd: int, ddepth: int,
                          mask_ratio: float = 0.75) -> float:
    """Matmul FLOPs of one training step per image (forward x 3)."""
    s = vit_size(model_size)
    D, L = s.embed_dim, (img // patch) ** 2
    te, td = 1 + int(L * (1 - mask_ratio)), 1 + L
    block = lambda T, d: T * 24 * d * d + 4 * T * T * d  # noqa: E731 - linears + attention
    fwd = (2 * L * patch * patch * 3 * D + s.depth * block(te, D) + 2 * te * D * dd
           + ddepth * block(td, dd) + 2 * L * dd * patch * patch * 3)
    return 3.0 * fwd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_step(model, opt, imgs, amp_dtype, device) -> None:
    """Our loop's step (pipeline/pretrain.py train_one_epoch, accum_iter 1, bf16: no scaler)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, _, _ = model(imgs)
    if not torch.isfinite(loss.detach()).item():  # the NaN check reads the loss every step
        raise FloatingPointError("ours: non-finite loss")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_step(model, opt, imgs, amp_dtype, device) -> None:
    """Forward, backward, AdamW: nothing else."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, _, _ = model(imgs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class ReferenceStep:
    """The reference engine_pretrain.py step (accum_iter 1): ``torch.cuda.amp.autocast()``
    (fp16 on CUDA, nothing on CPU), ``loss.item()``, NativeScalerWithGradNormCount (scale,
    backward, unscale, gradient norm, step, update), zero_grad, ``torch.cuda.synchronize()``."""

    def __init__(self, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def __call__(self, model, opt, imgs, amp_dtype, device) -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _, _ = model(imgs)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("reference: non-finite loss")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)  # get_grad_norm_
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad()
        _sync(device)


def time_steps(step, model, opt, imgs, steps: int, amp_dtype, device) -> float:
    """Seconds for ``steps`` calls of ``step`` (a training step)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, opt, imgs, amp_dtype, device)
    _sync(device)
    return time.perf_counter() - t0


def resolve_ref_amp(ref_amp: str, device: torch.device) -> torch.dtype | None:
    """The baseline's autocast dtype: the reference autocasts to fp16 on CUDA only."""
    if device.type != "cuda" or ref_amp == "off":
        return None
    return torch.float16 if ref_amp == "fp16" else torch.bfloat16


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", "--model", dest="model_size", default="tiny",
                    help="ViT size of the encoder (tiny, small, base, large, huge)")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--decoder-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="ours only (the baseline is fp32), resolved like pretrain.amp")
    ap.add_argument("--ref-step", default="reference", choices=("reference", "plain"),
                    help="the baseline's step: the reference engine's, or forward/backward/"
                         "AdamW only")
    ap.add_argument("--ref-amp", default="fp16", choices=("fp16", "bf16", "off"),
                    help="the baseline's autocast dtype on CUDA (the reference: fp16); on CPU "
                         "the reference's torch.cuda.amp.autocast does nothing (fp32)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for MFU (default on CUDA: 989, H100 SXM bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    setup_logging()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dims = dict(img_size=args.img_size, patch_size=args.patch, decoder_dim=args.decoder_dim,
                decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)
    ours = MAE(args.model_size, **dims).to(device)
    ref = RefMAE(args.model_size, **dims).to(device)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names, same weights
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    # Same work: equal losses on the same images and mask in fp32.
    noise = torch.rand(args.batch, ours.patch_embed.num_patches, device=device)
    with torch.no_grad():
        l_ours, l_ref = ours(imgs[:8], noise=noise[:8])[0], ref(imgs[:8], noise=noise[:8])[0]
    if not torch.allclose(l_ours, l_ref, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"models disagree: loss {l_ours.item()} vs {l_ref.item()}")

    amp_dtype = resolve_amp(args.amp, device)
    ref_dtype = resolve_ref_amp(args.ref_amp, device)
    fused = {"fused": True}
    opt_ours = torch.optim.AdamW(param_groups(ours, 0.05), lr=1e-4, betas=(0.9, 0.95), **fused)
    opt_ref = torch.optim.AdamW(param_groups(ref, 0.05), lr=1e-4, betas=(0.9, 0.95))
    ref_step = ReferenceStep(device) if args.ref_step == "reference" else plain_step
    sides = {"ours": (ours_step, ours, opt_ours, amp_dtype),
             "reference": (ref_step, ref, opt_ref, ref_dtype)}
    speeds: dict[str, list[float]] = {k: [] for k in sides}
    peak: dict[str, float] = {}
    for name, (st, m, o, dt) in sides.items():
        time_steps(st, m, o, imgs, args.warmup, dt, device)
    for r in range(args.rounds):
        for name, (st, m, o, dt) in sides.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sec = time_steps(st, m, o, imgs, args.steps, dt, device)
            speeds[name].append(args.batch * args.steps / sec)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
            log.info("round %d %-9s %8.1f images/s", r + 1, name, speeds[name][-1])

    flops = train_flops_per_image(args.model_size, args.img_size, args.patch,
                                  args.decoder_dim, args.decoder_depth)
    peak_tflops = args.peak_tflops or (H100_SXM_BF16_TFLOPS if device.type == "cuda" else None)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU {platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads",
           "torch": torch.__version__, "config": vars(args) | {"json": None},
           "amp_ours": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
           "amp_reference": str(ref_dtype).replace("torch.", "") if ref_dtype else "fp32",
           "reference_step": args.ref_step,
           "train_gflop_per_image": flops / 1e9, "peak_tflops_assumed": peak_tflops}
    for name in sides:
        ips = statistics.median(speeds[name])
        tflops = ips * flops / 1e12
        res[name] = {"images_per_s": ips, "rounds": speeds[name], "tflops": tflops,
                     "mfu": tflops / peak_tflops if peak_tflops else None,
                     "peak_mem_gib": peak.get(name)}
    res["speedup"] = res["ours"]["images_per_s"] / res["reference"]["images_per_s"]
    for name in sides:
        r = res[name]
        log.info("%-9s %8.1f images/s  %.3f TFLOP/s%s%s", name, r["images_per_s"], r["tflops"],
                 f"  MFU {100 * r['mfu']:.1f}% of {peak_tflops:g}" if r["mfu"] is not None
                 else "", f"  peak {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] else "")
    log.info("speed-up ours / reference: %.2fx  (%s, ours in %s, reference %s step in %s; "
             "%.1f GFLOP/image per training step)", res["speedup"], res["device"],
             res["amp_ours"], args.ref_step, res["amp_reference"], flops / 1e9)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
