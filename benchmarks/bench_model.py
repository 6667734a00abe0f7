"""Speed of the model pieces against the official PyTorch SAM 2, measured in the same run.

    python benchmarks/bench_model.py [--config sam2.1_tiny] [--repeats 5] [--memories 7]

Times (median of --repeats, after one warm-up call that also compiles) for:
  image encoder    one frame through Hiera + FPN + conv_s0/s1
  memory attention current frame against `--memories` spatial memories + 16 object pointers
  memory encoder   mask + features -> memory
  prompt + decoder one click, multimask
Both sides run float32 on the CPU with random weights; torch uses all cores it sees.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.reference


def _median_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (and compilation for JAX)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sam2.1_tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memories", type=int, default=7)
    ap.add_argument("--attention", default="auto", help="attention_impl for our side")
    ap.add_argument("--device", default="cpu", help="device for the official model (cpu or cuda)")
    args = ap.parse_args()

    import ml_collections
    import torch

    from medsam2_jax.model import sam2 as S
    from medsam2_jax.model.mask_decoder import mask_decoder
    from medsam2_jax.model.memory_attention import memory_attention
    from medsam2_jax.model.memory_encoder import memory_encoder
    from medsam2_jax.model.prompt_encoder import dense_pe, prompt_encoder
    from tests.reference import reference_image_model

    model, params, config = reference_image_model(args.config)
    model = model.to(args.device)
    cuda = args.device.startswith("cuda")
    config = ml_collections.ConfigDict(config.to_dict())
    config.attention_impl = args.attention
    cfg = ml_collections.FrozenConfigDict(config)
    s_img = config.image_size
    s = s_img // 16
    hw = s * s
    r = np.random.default_rng(0)
    img = r.standard_normal((1, s_img, s_img, 3)).astype(np.float32)
    n_ptr = 16 * 4
    mem = r.standard_normal((1, args.memories * hw + n_ptr, 64)).astype(np.float32)
    mem_pos = r.standard_normal(mem.shape).astype(np.float32)
    curr = r.standard_normal((1, hw, 256)).astype(np.float32)
    curr_pos = r.standard_normal((1, hw, 256)).astype(np.float32)
    feat = r.standard_normal((1, s, s, 256)).astype(np.float32)
    mask = r.standard_normal((1, s_img, s_img, 1)).astype(np.float32)
    hr = [r.standard_normal((1, 4 * s, 4 * s, 32)).astype(np.float32),
          r.standard_normal((1, 2 * s, 2 * s, 64)).astype(np.float32)]
    click = np.array([[[s_img * 0.4, s_img * 0.6]]], np.float32)
    label = np.array([[1]], np.int32)

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(args.device)
    nchw = lambda a: t(a.transpose(0, 3, 1, 2))
    rows = []
    tsync = torch.cuda.synchronize if cuda else (lambda: None)

    # Image encoder
    jit_enc = jax.jit(lambda p, x: S.forward_image(p, x, cfg))
    ours = lambda: jax.block_until_ready(jit_enc(params, img))
    with torch.inference_mode():
        ref = lambda: model.forward_image(nchw(img))
        rows.append(("image encoder", _median_seconds(ref, args.repeats, tsync), _median_seconds(ours, args.repeats)))

    # Memory attention
    jit_ma = jax.jit(lambda p, a, b, c, d: memory_attention(p, a, b, c, d, n_ptr, cfg))
    ours = lambda: jax.block_until_ready(jit_ma(params["memory_attention"], curr, curr_pos, mem, mem_pos))
    sf = lambda a: t(a).transpose(0, 1)
    with torch.inference_mode():
        ref = lambda: model.memory_attention([sf(curr)], sf(mem), [sf(curr_pos)], sf(mem_pos), num_obj_ptr_tokens=n_ptr)
        rows.append((f"memory attention ({args.memories} mem)", _median_seconds(ref, args.repeats, tsync),
                     _median_seconds(ours, args.repeats)))

    # Memory encoder
    jit_me = jax.jit(lambda p, a, b: memory_encoder(p, a, b, cfg))
    ours = lambda: jax.block_until_ready(jit_me(params["memory_encoder"], feat, mask))
    with torch.inference_mode():
        ref = lambda: model.memory_encoder(nchw(feat), nchw(mask), skip_mask_sigmoid=True)
        rows.append(("memory encoder", _median_seconds(ref, args.repeats, tsync), _median_seconds(ours, args.repeats)))

    # Prompt encoder + mask decoder
    def _dec(p, f, h, c, labels):
        sp, de = prompt_encoder(p["sam_prompt_encoder"], cfg, c, labels)
        return mask_decoder(p["sam_mask_decoder"], f, dense_pe(p["sam_prompt_encoder"], cfg), sp, de, True, cfg, h)

    jit_dec = jax.jit(_dec)
    ours = lambda: jax.block_until_ready(jit_dec(params, feat, hr, click, label))
    with torch.inference_mode():
        def ref():
            sp, de = model.sam_prompt_encoder((t(click), t(label)), None, None)
            return model.sam_mask_decoder(nchw(feat), model.sam_prompt_encoder.get_dense_pe(), sp, de, True, False,
                                          [nchw(h) for h in hr])

        rows.append(("prompt + mask decoder", _median_seconds(ref, args.repeats, tsync),
                     _median_seconds(ours, args.repeats)))

    print(f"\n{args.config} at {s_img} px, float32, official on {args.device} ({torch.get_num_threads()} torch "
          f"threads), ours on {jax.devices()[0].platform}, median of {args.repeats}, attention={args.attention}")
    print(f"{'piece':28s} {'official (s)':>13s} {'ours (s)':>10s} {'official/ours':>14s}")
    for name, ref_s, our_s in rows:
        print(f"{name:28s} {ref_s:13.3f} {our_s:10.3f} {ref_s / our_s:14.2f}")


if __name__ == "__main__":
    main()
