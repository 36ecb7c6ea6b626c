"""What a JSON output format costs: the token mask per step, and decode tokens/s with and without a format.

  python benchmarks/bench_format.py                      # SmolLM2 (49k tokens) and Gemma 3 (262k), 5 repetitions
  python benchmarks/bench_format.py --models smollm2 --reps 9 --json

Mask: milliseconds per call of Constraint.mask() in states met while writing JSON (between tokens, inside a
string, after a number, inside a `pattern` and after its match) and a tool reply's text, median of 50 calls
(--masks-only: only these). Step: what a generation step costs outside the model (sampling, mask,
detokenizer), on one logits vector replayed, so the forward pass's noise stays out. Decode: one session
per model, greedy and sampled (temperature 0.8, seed fixed), each repetition alternating free text, --format
json and a schema; a prompt that asks for a long list so every run reaches max_tokens. Tokens/s is the engine's
decode rate (first token excluded); the ratio is format / free, median of the repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmcli.engine import GenerationConfig, Session, encode_chat, load  # noqa: E402
from llmcli.grammar import Constraint, vocabulary_bytes  # noqa: E402
from llmcli.json_schema import json_grammar  # noqa: E402
from llmcli.sampling import SamplingConfig  # noqa: E402
from llmcli.tools import CallSyntax, Tool, ToolChoice  # noqa: E402

MODELS = {"smollm2": REPO / ".test-models" / "models" / "smollm2" / "model.gguf",
          "gemma3": REPO / ".test-models" / "models" / "gemma3" / "model.gguf"}
PROMPT = "Write a JSON object that maps the 40 largest cities of Europe to their countries and populations."
SCHEMA = {"type": "object", "properties": {"cities": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                     "population": {"type": "integer"}},
    "required": ["name", "country", "population"]}}}, "required": ["cities"]}
PATTERNS = {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\+?[0-9 ()-]{7,20}$"},
                                            "note": {"type": "string", "pattern": "urgent"}}}
# a template's own tool calls (<tool_call> tags), `auto`: text that may go on into a call
TOOLS = ToolChoice((Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}}),),
                   required=False, syntax=CallSyntax("<tool_call>\n", "\n</tool_call>\n<tool_call>\n",
                                                     "\n</tool_call>"))
STATES = {"between tokens": ("schema", b'{"cities": ['), "in a string": ("schema", b'{"cities": [{"name": "Par'),
          "after a number": ("schema", b'{"cities": [{"name": "Paris", "country": "France", "population": 2102'),
          "in a pattern": ("patterns", b'{"phone": "+33 1'),
          "after a pattern's match": ("patterns", b'{"phone": "+33 1 23 45 67", "note": "urgent, call'),
          "tool reply, text": ("tools", b"Let me check"), "tool reply, text after <": ("tools", b"Let me check <")}


def mask_ms(lm) -> dict[str, float]:
    vocab = vocabulary_bytes(lm.tokenizer, lm.hparams.n_vocab)
    grammars = {"schema": json_grammar(SCHEMA), "patterns": json_grammar(PATTERNS), "tools": TOOLS.grammar()}
    out = {}
    for name, (grammar, prefix) in STATES.items():
        c = Constraint(grammars[grammar], vocab, lm.tokenizer.stop_ids)
        assert c.feed(prefix)
        c.mask()
        times = []
        for _ in range(50):
            t = time.perf_counter()
            c.mask()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def step_ms(lm, n: int) -> dict[str, float]:
    """Milliseconds a generation step spends outside the model (sampling, the mask, the detokenizer): `n` steps
    on one logits vector of the model (the prompt's last), taken away from the forward pass's noise. Median of
    the steps, per mode and format."""
    session = Session(lm, 1024)
    prompt = encode_chat(session, [{"role": "user", "content": PROMPT}])
    logits = session.prefill(prompt)
    out = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        for fmt, grammar in (("free", None), ("json", json_grammar()), ("schema", json_grammar(SCHEMA))):
            config = GenerationConfig(max_tokens=n, grammar=grammar,
                                      sampling=SamplingConfig(temperature=temperature, seed=7))
            gen = session.start(prompt, config)
            times = []
            while gen.finish is None:
                t = time.perf_counter()
                gen.step(logits)
                times.append(time.perf_counter() - t)
            out[f"{mode} {fmt}"] = statistics.median(times) * 1e3
    return out


def decode(lm, reps: int, n: int) -> dict[str, dict[str, list[float]]]:
    session = Session(lm, 1024)
    prompt = encode_chat(session, [{"role": "user", "content": PROMPT}])
    formats = {"free": None, "json": json_grammar(), "schema": json_grammar(SCHEMA)}
    rates: dict[str, dict[str, list[float]]] = {}
    for _ in range(reps):
        for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            for fmt, grammar in formats.items():
                config = GenerationConfig(max_tokens=n, grammar=grammar,
                                          sampling=SamplingConfig(temperature=temperature, seed=7))
                last = list(session.generate(prompt, config))[-1]
                key = f"{mode} {fmt}"
                rates.setdefault(key, {"tps": [], "tokens": []})
                rates[key]["tps"].append(last.generation_tps)
                rates[key]["tokens"].append(last.generation_tokens)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-n", type=int, default=128, help="tokens per generation")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("--masks-only", action="store_true", help="only the mask's milliseconds")
    args = ap.parse_args()
    report = {}
    for name in args.models.split(","):
        lm = load(MODELS[name])
        masks = mask_ms(lm)
        steps = {} if args.masks_only else step_ms(lm, args.n)
        rates = {} if args.masks_only else decode(lm, args.reps, args.n)
        report[name] = {"n_vocab": lm.hparams.n_vocab, "mask_ms": masks, "step_ms": steps, "decode": rates}
        print(f"\n{name} ({lm.hparams.n_vocab} tokens), {lm.model.name} backend")
        print("| mask state | ms |\n|---|---:|")
        for state, ms in masks.items():
            print(f"| {state} | {ms:.2f} |")
        print("| step outside the model | ms |\n|---|---:|")
        for key, ms in steps.items():
            print(f"| {key} | {ms:.2f} |")
        print("| decode | tok/s (median) | tokens | vs free |\n|---|---:|---:|---:|")
        for key, r in rates.items():
            mode = key.split()[0]
            free = rates[f"{mode} free"]["tps"]
            ratio = statistics.median(a / b for a, b in zip(r["tps"], free, strict=True))
            print(f"| {key} | {statistics.median(r['tps']):.1f} ({min(r['tps']):.1f}-{max(r['tps']):.1f}) | "
                  f"{statistics.median(r['tokens']):.0f} | {ratio:.2f}x |")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
