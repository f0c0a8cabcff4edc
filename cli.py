"""Command line: `python -m infer demo` and `python -m infer generate PROMPT...`."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def demo(args: argparse.Namespace) -> int:
    """Compile a small random-weight Llama-shaped transformers model and compare with eager."""
    import torch
    import transformers

    from .compiler import last_report

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                                      num_hidden_layers=args.layers, num_attention_heads=8,
                                      num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="infer", options={"inner_compiler": args.inner_compiler})
        start = time.perf_counter()
        actual = compiled(input_ids=ids, use_cache=False).logits
        seconds = time.perf_counter() - start
    print(f"demo: LlamaForCausalLM, {args.layers} layers, hidden 256, random weights, input {tuple(ids.shape)}")
    print(last_report().summary())
    print(f"first compiled call (compile included): {seconds:.2f}s")
    print(f"max |eager - compiled| = {(expected - actual).abs().max().item():.3e}")
    return 0


WARMUP_PROMPT_LEN = 8  # token ids of the warm-up prompts that compile outside the timed region


def generate(args: argparse.Namespace) -> int:
    """Complete the prompts with the engine; print each completion and the decode throughput."""
    from . import LLM, SamplingParams
    from .runtime.engine.checkpoint_folder import check_model_folder, has_chat_template

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    model = args.model
    if model is None:
        from .models.default import default_model_path
        model = default_model_path()
    check_model_folder(model)
    if args.chat and not has_chat_template(model):
        raise ValueError(f"--chat but the tokenizer of {model} has no chat template")
    llm = LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              compile=not args.no_compile, compile_options={"inner_compiler": args.inner_compiler})
    if not args.no_compile:
        _warm_up(llm, len(args.prompts))
    start = time.perf_counter()
    outputs = llm.generate(args.prompts, params, use_tqdm=sys.stderr.isatty(), chat=args.chat)
    seconds = time.perf_counter() - start
    for i, out in enumerate(outputs):
        print(f"[{i}] prompt: {out.prompt!r}")
        if out.error is not None:
            print(f"[{i}] error: {out.error}")
            continue
        print(f"[{i}] completion ({len(out.token_ids)} tokens, {out.finish_reason}): {out.text!r}")
    num_tokens = sum(len(out.token_ids) for out in outputs)
    print(f"generated {num_tokens} tokens in {seconds:.2f} s: {num_tokens / seconds:.1f} tokens/s "
          f"({len(outputs)} prompts, compile={'off' if args.no_compile else args.inner_compiler}, warm-up excluded)")
    return 1 if any(out.error is not None for out in outputs) else 0


def _warm_up(llm, num_prompts: int) -> None:
    """Compile the prefill graph and the decode graphs (batch of ``num_prompts``, then of 1) untimed."""
    from . import SamplingParams

    prompts = [[1] * WARMUP_PROMPT_LEN for _ in range(num_prompts)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 if i == 0 else 2, ignore_eos=True)
              for i in range(num_prompts)]
    llm.generate(prompts, params, use_tqdm=False)


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete prompts with the engine (default model: SmolLM2-135M-Instruct)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly")
    p.add_argument("--inner-compiler", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(run=generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a built-in random-weight Llama and print the compile report")
    p.add_argument("--inner-compiler", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--layers", type=int, default=2)
    p.set_defaults(run=demo)
    _add_generate_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line; the traceback is behind --debug
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error's message on one line, with its type when the message alone would not say it."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, FileNotFoundError, ImportError, TypeError)):
        return message
    return f"{type(error).__name__}: {message}"


if __name__ == "__main__":
    sys.exit(main())
