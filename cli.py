"""Command line: `python -m infer demo` (and later `generate`)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a built-in random-weight Llama and print the compile report")
    p.add_argument("--inner-compiler", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--layers", type=int, default=2)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
