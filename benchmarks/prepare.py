"""End-to-end `camelid prepare` vs raw tokenization with the `tokenizers` library, side by side.

Both do the same work — the documents of the built-in corpus (this Python's standard library)
with the same tokenizer:
  peer     `tokenizers.Tokenizer.encode_batch(texts)` on texts already in memory (it uses every
           core through its own thread pool); `encode_batch_fast` (no offsets) is shown too,
           and tiktoken's `encode_ordinary_batch` with the same ranks — the engine camelid
           itself encodes with when it provably gives the same ids — so the pipeline's own
           overhead shows as well.
  camelid  `prepare()` from the files on disk: read, normalise, filter, exact + MinHash dedup,
           tokenize in worker processes, write shards and the manifest.
Throughput is counted for both as the corpus's tokens (the peer's count) per second of wall
time, so the ratio is the peer's time over camelid's. Target: >= 0.8x.

    python benchmarks/prepare.py                     # trains an 8192-token tokenizer first
    python benchmarks/prepare.py --tokenizer DIR --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from camelid.data import PrepareConfig, prepare, sources
from camelid.data.clean import CleanConfig, clean
from camelid.tokenizer import Tokenizer, train_tokenizer


def corpus_texts() -> list[str]:
    """The built-in corpus's documents as prepare sees them (decoded, NFC-normalised)."""
    texts = []
    stats = sources.ReadStats()
    for task in sources.resolve(sources.BUILTIN):
        for doc in sources.read(task, stats)[1]:
            text, _ = clean(doc.text, CleanConfig())
            texts.append(text)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokenizer", help="tokenizer dir (default: train one on the corpus)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="prepare workers (default: cores)")
    args = ap.parse_args()

    import tokenizers

    texts = corpus_texts()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = os.path.join(tmp, "tok")
            t0 = time.perf_counter()
            train_tokenizer(texts, args.vocab_size).save(tok_dir)
            print(f"trained a {args.vocab_size}-token tokenizer in {time.perf_counter() - t0:.1f}s")
        vocab = Tokenizer.load(tok_dir).vocab_size
        raw = tokenizers.Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
        n_tokens = sum(len(e.ids) for e in raw.encode_batch_fast(texts, add_special_tokens=False))

        # The engine camelid encodes with when it provably gives the same ids (docs/tokenizer.md).
        twin = Tokenizer.load(tok_dir)._backend.twin
        times: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": [], "camelid": []}
        if twin is not None:
            times["tiktoken_twin"] = []
        for r in range(args.repeats):
            if twin is not None:
                t0 = time.perf_counter()
                twin.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
                times["tiktoken_twin"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw.encode_batch(texts, add_special_tokens=False)
            times["encode_batch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw.encode_batch_fast(texts, add_special_tokens=False)
            times["encode_batch_fast"].append(time.perf_counter() - t0)
            out = Path(tmp) / f"ds{r}"
            t0 = time.perf_counter()
            m = prepare(PrepareConfig(), tok_dir, out, workers=args.workers, progress=False)
            times["camelid"].append(time.perf_counter() - t0)
            shutil.rmtree(out)

    med = {k: statistics.median(v) for k, v in times.items()}
    chars = sum(map(len, texts))
    print(
        f"prepare: built-in corpus, {len(texts)} documents, {chars / 1e6:.1f}M characters, "
        f"{n_tokens:,} tokens; vocab {vocab}; "
        f"{os.cpu_count()} cores; tokenizers {tokenizers.__version__}"
    )
    st = m["stats"]
    print(
        f"camelid kept {st['kept']} of {st['documents']} documents "
        f"(removed: {', '.join(f'{k} {v}' for k, v in st['removed'].items() if v) or 'none'})"
    )
    for name, t in med.items():
        print(f"  {name:<18} {n_tokens / t:12,.0f} tokens/s   ({t:.2f}s, median of {args.repeats})")
    print(f"ratio camelid / encode_batch:      {med['encode_batch'] / med['camelid']:.2f}x")
    print(f"ratio camelid / encode_batch_fast: {med['encode_batch_fast'] / med['camelid']:.2f}x")
    if "tiktoken_twin" in med:
        print(f"ratio camelid / tiktoken twin:     {med['tiktoken_twin'] / med['camelid']:.2f}x")


if __name__ == "__main__":
    main()
