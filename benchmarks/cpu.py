"""The ``cpu`` scenario: the engine against transformers' eager ``generate`` on the CPU, in one process.

The README's main job on a machine without a GPU: the embedded SmolLM2-135M-Instruct (real
weights), greedy, ``--tokens`` new tokens after a short prompt, at batch 1 and 8, in bfloat16 (the
checkpoint's dtype, the engine's default) and float32. Each row times whole ``generate`` calls
after a warm-up call of the same shape (compiles and first-touch costs excluded from both sides),
the two sides alternating for five rounds: tokens/s is each side's median round, the ratio the
median of the rounds' own ratios (both sides of a round see the same machine; a shared host's
speed drifts by tens of percent within a minute), with the range over the rounds beside it.
Tokens/s counts new tokens. The floor is the time to stream the weights once per decode step
(``weight bytes / measured read bandwidth``), as tokens/s: ``batch / floor seconds``. The
bandwidth is that of a sum over a buffer far larger than the caches, on every thread torch uses.

``python -m infer.benchmarks cpu [--tokens 64] [--batch 1 8] [--dtypes bfloat16 float32]``
(``--tiny``: a tiny random Llama in float32 and the eager inner compiler, for a test of the
harness itself).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from .harness import Column, Settings, Table, measure, ok_rows, open_table

COLUMNS = [Column("dtype", "dtype"), Column("batch", "batch"), Column("engine_tok_s", "infer tok/s", ".1f"),
           Column("hf_tok_s", "transformers tok/s", ".1f"), Column("ratio", "infer / transformers", ".2f"),
           Column("ratio_range", "ratio, all rounds"),
           Column("floor_tok_s", "floor tok/s", ".0f"), Column("of_floor", "infer of floor", ".0%"),
           Column("engine_ms", "infer ms/token-step", ".1f"), Column("hf_ms", "transformers ms/token-step", ".1f")]
PROMPT = "The history of the city begins"
DTYPES = ("bfloat16", "float32")
REPEATS = 5  # alternating rounds per row


def read_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best read bandwidth of a sum over ``nbytes`` of initialized float32 (far beyond the caches)."""
    x = torch.rand(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams: every parameter once (a tied embedding / LM head once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rounds(fns: dict, repeats: int) -> list[dict]:
    """Seconds of each call in each of ``repeats`` rounds, after one warm-up call each; the calls
    alternate within a round, so that both sides of a round see the same machine (a shared host's
    speed drifts by tens of percent within a minute)."""
    for fn in fns.values():
        fn()
    out = []
    for _ in range(repeats):
        times = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        out.append(times)
    return out


def _model_folder(settings: Settings) -> Path:
    if not settings.tiny:
        from ..models.default import default_model_path
        return default_model_path()
    import transformers
    folder = Path(settings.tmp_dir or "/tmp") / "infer-cpu-tiny"
    if not (folder / "config.json").is_file():
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        from tokenizers import Tokenizer, models, pre_tokenizers
        words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 512)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                             eos_token="</s>").save_pretrained(folder)
    return folder


def run(settings: Settings, tokens: int = 64, dtypes: tuple[str, ...] = DTYPES) -> Table:
    import transformers

    from .. import LLM, SamplingParams

    table = open_table(settings, "cpu", "CPU decode: infer.LLM vs transformers generate (greedy)", COLUMNS,
                       ("dtype", "batch"))
    folder = _model_folder(settings)
    table.meta.update(model=folder.name, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                      new_tokens=tokens, read_gbps=round(read_bandwidth_gbps(), 1))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for dtype in dtypes:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        floor_s = weight_bytes(hf) / (table.meta["read_gbps"] * 1e9)
        # The engine's defaults (compiled, Inductor); --tiny checks the harness: the eager inner compiler.
        options = {"inner_compiler": "eager"} if settings.tiny else None
        llm = LLM(folder, dtype=dtype, device="cpu", compile_options=options)
        for batch in settings.batches:
            def row(batch=batch) -> dict:
                inputs = tokenizer([PROMPT] * batch, return_tensors="pt")

                def hf_generate():
                    with torch.inference_mode():
                        hf.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id or 0)
                timed = rounds({"hf": hf_generate,
                                "engine": lambda: llm.generate([PROMPT] * batch, params, use_tqdm=False)},
                               repeats=1 if settings.tiny else REPEATS)
                hf_s = statistics.median(t["hf"] for t in timed)
                engine_s = statistics.median(t["engine"] for t in timed)
                ratios = sorted(t["hf"] / t["engine"] for t in timed)  # per round: same machine state
                engine_tok_s, hf_tok_s = batch * tokens / engine_s, batch * tokens / hf_s
                return dict(engine_tok_s=engine_tok_s, hf_tok_s=hf_tok_s, ratio=statistics.median(ratios),
                            ratio_range=f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
                            floor_tok_s=batch / floor_s, of_floor=engine_tok_s / (batch / floor_s),
                            engine_ms=engine_s / tokens * 1e3, hf_ms=hf_s / tokens * 1e3)
            measure(table, dict(dtype=dtype, batch=batch), row)
        del llm, hf
    return table


def plot(fig, table: Table) -> None:
    ax = fig.subplots()
    rows = ok_rows(table)
    labels = [f"{r['dtype']} b{r['batch']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["engine_tok_s"] for r in rows], width=0.4, label="infer")
    ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], width=0.4, label="transformers")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("new tokens/s")
    ax.legend()
