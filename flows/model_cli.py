"""The commands that use a trained model: ``lm-sleep predict``, ``generate`` and ``export``.

Argument parsing and input/output only; the glue is tasks/serving.py, the model work model/serving/.
Bad input (a missing or corrupt state, an unreadable, empty or non-UTF-8 file) is one line on
stderr naming the file, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.errors import reporting_errors
from model.errors import UserError
from tasks.serving import generation_rows, open_state, prediction_rows, write_export

STDIN = "-"


class InputError(UserError, ValueError):
    """Input texts that cannot be read; the message names the file (and line)."""


def state_arg(value: str) -> int | str:
    """``--state``: a period number (digits) or a state directory."""
    return int(value) if value.isdigit() else value


def read_texts(source: str | None, field: str) -> list[str]:
    """Texts from a file, or stdin for None or ``-``: one per line, or JSON Lines of objects with a string
    ``field`` (when the first non-blank line is a JSON object). Blank lines are skipped."""
    name = "<stdin>" if source in (None, STDIN) else source
    try:
        data = sys.stdin.buffer.read() if source in (None, STDIN) else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text (invalid byte at offset {e.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{name}: no texts (the input is empty)")
    if not _json_object(lines[0][1]):
        return [line for _, line in lines]
    texts = []
    for n, line in lines:
        obj = _json_object(line)
        if obj is None or not isinstance(obj.get(field), str) or not obj[field].strip():
            raise InputError(f"{name}:{n}: expected a JSON object with a non-empty string field '{field}'")
        texts.append(obj[field])
    return texts


def _json_object(line: str) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _write_jsonl(rows: list[dict]) -> None:
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"lm-sleep {command}", description=description)
    ap.add_argument("--state", type=state_arg, required=True, metavar="PERIOD|PATH",
                    help="a period number (its sleep state, <dream.state_dir>/period-N) or a state directory")
    ap.add_argument("--params", default="params.yaml", help="the params file whose model and paths the state uses")
    return ap


@reporting_errors("lm-sleep predict")
def predict_main(argv: list[str] | None = None) -> int:
    ap = _parser("predict", "The most likely labels of each text, with their probabilities among the candidate "
                 "labels, as JSON Lines: {\"text\": ..., \"labels\": [{\"label\": ..., \"score\": ...}, ...]}.")
    ap.add_argument("input", nargs="?", default=STDIN, metavar="INPUT",
                    help="a file of texts, one per line or JSON Lines with a 'text' field (default: stdin, also '-')")
    ap.add_argument("--labels", nargs="+", metavar="LABEL",
                    help="the candidate labels (default: every label the state has seen); put INPUT before it")
    ap.add_argument("--top-k", type=int, default=3, help="how many labels per text, best first (default 3)")
    args = ap.parse_args(argv)
    texts = read_texts(args.input, "text")
    _write_jsonl(prediction_rows(open_state(args.state, args.params), texts, args.labels, args.top_k))
    return 0


@reporting_errors("lm-sleep generate")
def generate_main(argv: list[str] | None = None) -> int:
    ap = _parser("generate", "A continuation of each prompt, every memory level on (with prototype routing, in "
                 "the view of the prompt's period), as JSON Lines: {\"prompt\": ..., \"text\": ...}.")
    ap.add_argument("prompts", nargs="+", metavar="PROMPT",
                    help="the prompts; '-' reads them from stdin (one per line, or JSON Lines with a 'prompt' field)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="most tokens written per prompt (default 32)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: no cut)")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    args = ap.parse_args(argv)
    prompts = read_texts(STDIN, "prompt") if args.prompts == [STDIN] else args.prompts
    _write_jsonl(generation_rows(open_state(args.state, args.params), prompts, args.max_new_tokens, args.temperature,
                                 args.top_p, args.seed))
    return 0


@reporting_errors("lm-sleep export")
def export_main(argv: list[str] | None = None) -> int:
    ap = _parser("export", "Write the state as a Hugging Face directory: AutoModelForCausalLM.from_pretrained(DIR, "
                 "trust_remote_code=True) (safetensors, config, tokenizer, modeling_lm_sleep.py, checksums).")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="the directory to write (new, empty, or an earlier export, which is replaced atomically)")
    args = ap.parse_args(argv)
    trained = open_state(args.state, args.params)
    out = write_export(trained, args.out)
    print(f"exported {trained.state} (period {trained.period}) -> {out}")
    return 0
