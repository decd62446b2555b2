"""CUDA check and GPU timings, peftkit beside Hugging Face PEFT (run on a GPU machine).

Correctness on the GPU (fp32 and bf16): identity at init, merged == unmerged,
DoRA, per-row routing == separate runs; torch.compile (inductor's Triton kernels) against eager for a
training step's loss and gradients and an inference forward (`compiled`). Timings (bf16, Llama hidden 2048,
8 layers, 16 heads, intermediate 5504, vocab 32000, batch 8 x seq 512; LoRA
r=16 on all linear layers): train step, unmerged and merged forward, DoRA
train step, a mixed batch routed over 8 adapters. Medians of CUDA-synchronized
wall times, the two libraries interleaved.

QLoRA (4-bit NF4, bf16 compute) and LoKr are timed against peft as well (`methods`).

Run: python bench/gpu_check.py [correctness|compiled|timings|methods]
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scratch import scratch_folder  # noqa: E402
from timing import lm_forward, lm_train_step  # noqa: E402

warnings.filterwarnings("ignore")


def build(hidden=2048, layers=8, heads=16, inter=5504, vocab=32000, dtype=torch.bfloat16, device="cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def cuda_time(fns: dict, repeats: int = 10, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def correctness() -> None:
    import peftkit

    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        base = build(hidden=256, layers=2, heads=4, inter=512, vocab=1000, dtype=dtype)
        ids = torch.randint(0, 1000, (4, 64), device="cuda")
        with torch.no_grad():
            ref = base(ids).logits.float()
        for spec in ("lora[r=8,target_modules=all-linear]", "lora[r=8,use_dora=true,target_modules=all-linear]",
                     "ia3", "seq_bn", "bitfit[add_missing=true]"):
            model = peftkit.adapt(copy.deepcopy(base), spec)
            with torch.no_grad():
                same = (model(ids).logits.float() - ref).abs().max().item()
                for p in model.adapter_parameters("default"):
                    p.add_(torch.randn_like(p) * 0.02)
                out = model(ids).logits.float()
                merged = None
                if model.adapter_record("default").method.can_merge:
                    model.merge_adapter()
                    merged = (model(ids).logits.float() - out).abs().max().item()
            ok = same <= atol and (merged is None or merged <= atol * 10)
            print(f"  {str(dtype):15} {spec:48} identity diff {same:.2e}  merge diff "
                  f"{'-' if merged is None else f'{merged:.2e}'}  {'ok' if ok else 'FAIL'}")
        # routing == separate runs
        model = peftkit.adapt(copy.deepcopy(base), "lora[r=8,init_weights=false]", adapter_name="a")
        model.add_adapter("b", "lora[r=8,init_weights=false,target_modules=all-linear]")
        names = ["a", "b", "__base__", "b"]
        with torch.no_grad():
            mixed = model(ids, adapter_names=names).logits.float()
            worst = 0.0
            for row, name in enumerate(names):
                model.set_active(None if name == "__base__" else name)
                single = model(ids[row:row + 1]).logits.float()
                worst = max(worst, (single[0] - mixed[row]).abs().max().item())
        print(f"  {str(dtype):15} routing rows vs separate runs: max diff {worst:.2e}  "
              f"{'ok' if worst <= atol * 10 else 'FAIL'}")


def compiled(device: str = "cuda") -> None:
    """torch.compile(model, fullgraph=True) with the default compiler (Triton kernels on a GPU) against eager:
    a training step's loss and adapter gradients, and an inference forward, for the fused LoRA and DoRA layers
    and LoKr (float32, so the two differ by the compiler's rounding alone)."""
    import peftkit

    base = build(hidden=256, layers=2, heads=4, inter=512, vocab=1000, dtype=torch.float32, device=device)
    ids = torch.randint(0, 1000, (4, 64), device=device)
    for spec in ("lora[r=8,init_weights=false,target_modules=all-linear]",
                 "lora[r=8,init_weights=false,use_dora=true,target_modules=all-linear]",
                 "lokr[r=8,init_weights=false,target_modules=all-linear]"):
        torch._dynamo.reset()
        model = peftkit.adapt(copy.deepcopy(base), spec).train()
        params = list(model.adapter_parameters("default"))
        results = []
        for run in (model, torch.compile(model, fullgraph=True)):
            loss = run(input_ids=ids, labels=ids).loss
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
        (eager_loss, eager_grads), (loss, grads) = results
        grad_diff = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
                        for g, e in zip(grads, eager_grads))
        model.eval()
        with torch.no_grad():
            forward_diff = (torch.compile(model, fullgraph=True)(ids).logits - model(ids).logits).abs().max().item()
        loss_diff = (loss - eager_loss).abs().item()
        ok = loss_diff <= 1e-4 and grad_diff <= 1e-3 and forward_diff <= 1e-3
        print(f"  {spec:66} loss diff {loss_diff:.2e}  gradient diff (of the largest) {grad_diff:.2e}  "
              f"forward diff {forward_diff:.2e}  {'ok' if ok else 'FAIL'}")


def timings() -> None:
    import peft

    import peftkit

    base = build()
    ids = torch.randint(0, 32000, (8, 512), device="cuda")
    tmp = scratch_folder()
    ours = peftkit.adapt(copy.deepcopy(base), "lora[r=16,alpha=32,target_modules=all-linear]")
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.normal_(0, 0.02)
    ours.save_adapter(f"{tmp}/a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a", is_trainable=True)
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()

    def step(model):
        return lm_train_step(model, ids)

    def fwd(model):
        return lm_forward(model, ids)

    for m in (ours, theirs, frozen):
        m.train()
    t = cuda_time({"peftkit": step(ours), "peft": step(theirs), "frozen": step(frozen)})
    print(f"  train step: peftkit {t['peftkit']*1e3:.1f} ms, peft {t['peft']*1e3:.1f} ms, ratio "
          f"{t['peftkit']/t['peft']:.3f}; x frozen-base fwd+bwd: {t['peftkit']/t['frozen']:.3f} vs "
          f"{t['peft']/t['frozen']:.3f}")
    for m in (ours, theirs):
        m.eval()
    f = cuda_time({"peftkit": fwd(ours), "peft": fwd(theirs), "base": fwd(base)})
    print(f"  unmerged forward: peftkit {f['peftkit']*1e3:.1f} ms, peft {f['peft']*1e3:.1f} ms, ratio "
          f"{f['peftkit']/f['peft']:.3f}; overhead vs base {f['peftkit']/f['base']-1:+.1%} vs {f['peft']/f['base']-1:+.1%}")
    ours.merge_adapter()
    theirs.merge_adapter()
    g = cuda_time({"peftkit": fwd(ours), "peft": fwd(theirs)})
    print(f"  merged forward: ratio {g['peftkit']/g['peft']:.3f}")
    del ours, theirs

    # DoRA training step
    ours = peftkit.adapt(copy.deepcopy(base), "lora[r=16,alpha=32,use_dora=true,target_modules=all-linear]")
    ours.save_adapter(f"{tmp}/d")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/d", is_trainable=True)
    for m in (ours, theirs):
        m.train()
    d = cuda_time({"peftkit": step(ours), "peft": step(theirs)}, repeats=6)
    for m in (ours, theirs):
        m.eval()
    e = cuda_time({"peftkit": fwd(ours), "peft": fwd(theirs)}, repeats=6)
    print(f"  DoRA train step ratio {d['peftkit']/d['peft']:.3f} ({d['peftkit']*1e3:.1f} vs {d['peft']*1e3:.1f} ms); "
          f"DoRA unmerged forward ratio {e['peftkit']/e['peft']:.3f} ({e['peftkit']*1e3:.1f} vs {e['peft']*1e3:.1f} ms)")
    del ours, theirs

    # mixed batch over 8 adapters
    ours = peftkit.AdaptedModel(copy.deepcopy(base))
    theirs = None
    for i in range(8):
        name = f"a{i}"
        ours.add_adapter(name, "lora[r=16,alpha=32,target_modules=all-linear,init_weights=false]")
        ours.save_adapter(f"{tmp}/{name}", name)
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{name}", adapter_name=name)
        else:
            theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
    ours.eval()
    theirs.eval()
    names = [f"a{i % 8}" for i in range(8)]

    def routed(model):
        def run():
            with torch.inference_mode():
                model(input_ids=ids, adapter_names=names)
        return run

    r = cuda_time({"peftkit": routed(ours), "peft": routed(theirs), "base": fwd(base)}, repeats=6)
    print(f"  mixed batch over 8 adapters: peftkit {r['peftkit']*1e3:.1f} ms, peft {r['peft']*1e3:.1f} ms, "
          f"ratio {r['peftkit']/r['peft']:.3f}; overhead vs base {r['peftkit']/r['base']-1:+.1%} vs "
          f"{r['peft']/r['base']-1:+.1%}")


def methods() -> None:
    """QLoRA (4-bit NF4 base, bf16 compute) and LoKr, peftkit beside peft on the same weights."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peftkit

    tmp = scratch_folder()
    build(hidden=1024, layers=4, heads=8, inter=2816, vocab=32000, dtype=torch.float32).save_pretrained(f"{tmp}/b")
    ids = torch.randint(0, 32000, (8, 512), device="cuda")

    def quantized():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(f"{tmp}/b", quantization_config=config,
                                                    device_map={"": "cuda"}, dtype=torch.bfloat16)

    ours = peftkit.adapt(quantized(), "lora[r=16,alpha=32,target_modules=all-linear]")
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.normal_(0, 0.02)
    ours.save_adapter(f"{tmp}/qlora")
    theirs = peft.PeftModel.from_pretrained(quantized(), f"{tmp}/qlora", is_trainable=True)
    for m in (ours, theirs):
        m.train()
    with torch.no_grad():
        diff = (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max().item()
    t = cuda_time({"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(theirs, ids)}, repeats=6)
    print(f"  QLoRA (h1024x4, 4-bit NF4, bf16 compute, r=16): train step peftkit {t['peftkit']*1e3:.1f} ms, peft "
          f"{t['peft']*1e3:.1f} ms, ratio {t['peftkit']/t['peft']:.3f}; max logit diff {diff:.2e}")
    del ours, theirs
    torch.cuda.empty_cache()

    base = build()  # bf16, as the timings above
    ours = peftkit.adapt(copy.deepcopy(base), "lokr[r=16,alpha=32,init_weights=false,target_modules=all-linear]")
    ours.save_adapter(f"{tmp}/lokr")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/lokr", is_trainable=True)
    for m in (ours, theirs):
        m.train()
    with torch.no_grad():
        diff = (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max().item()
    t = cuda_time({"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(theirs, ids)}, repeats=6)
    for m in (ours, theirs):
        m.eval()
    f = cuda_time({"peftkit": lm_forward(ours, ids), "peft": lm_forward(theirs, ids), "base": lm_forward(base, ids)}, repeats=6)
    print(f"  LoKr (h2048x8, bf16, r=16): train step ratio {t['peftkit']/t['peft']:.3f} "
          f"({t['peftkit']*1e3:.1f} vs {t['peft']*1e3:.1f} ms); unmerged forward ratio {f['peftkit']/f['peft']:.3f} "
          f"(+{f['peftkit']/f['base']-1:.1%} vs +{f['peft']/f['base']-1:.1%} over the base); max logit diff "
          f"{diff:.2e}")


def main() -> None:
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.cuda.get_device_name()}")
    only = sys.argv[1:]  # e.g. `correctness`
    for name, fn in (("correctness", correctness), ("compiled", compiled), ("timings", timings),
                     ("methods", methods)):
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # report and go on: one device run must bring back everything it can
            import traceback

            traceback.print_exc()
            print(f"  {name} failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
