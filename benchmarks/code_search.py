"""The code-search task: find a standard-library function from its docstring.

The convergence benchmark's ``search`` task (``benchmarks/convergence_tasks.py``). Pairs of (key, query): the key
is a function's or method's qualified name and signature (``json.dumps(obj, *, skipkeys=False, ...)``), the query
its docstring. Nothing is downloaded: both come from the running Python's standard library. A
:class:`DualEncoder` (all-MiniLM-L6-v2 with mean pooling, as sentence-transformers uses it) embeds both;
training uses in-batch negatives (each query's own key against the other keys of the batch, cross-entropy
on scaled cosine similarities, as sentence-transformers' ``MultipleNegativesRankingLoss``); evaluation is
recall@1 on held-out pairs, every held-out key a candidate for every held-out query.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

import torch
from torch import nn

# Modules scanned, in this order (an object re-exported by a later module keeps its first name). Modules with
# ``__all__`` give only the names listed there, so that re-exports (``shlex.StringIO``) stay out.
SEARCH_MODULES = tuple("""
builtins os os.path sys re string textwrap difflib unicodedata codecs collections heapq bisect array itertools
functools operator math cmath statistics decimal fractions random datetime time calendar zoneinfo pathlib shutil
glob fnmatch tempfile filecmp fileinput stat linecache io json csv pickle copy struct base64 binascii hashlib hmac
secrets zlib gzip bz2 lzma zipfile tarfile configparser tomllib plistlib netrc argparse optparse getopt shlex logging
threading queue sched subprocess signal socket selectors asyncio concurrent.futures multiprocessing mmap ctypes
email.message email.utils mailbox mimetypes http.client http.cookies urllib.parse urllib.request imaplib smtplib
ftplib poplib xml.etree.ElementTree xml.dom.minidom html html.parser sqlite3 typing inspect ast dis tokenize
traceback warnings contextlib abc enum dataclasses weakref types pprint reprlib uuid ipaddress locale gettext
platform sysconfig importlib.util pkgutil unittest doctest timeit pstats tracemalloc gc graphlib numbers code
wave colorsys
""".split())
MIN_DOC = 20  # characters
# a docstring's first line that only restates the call, e.g. "acquire(blocking=True) -> bool"
_SIG_LINE = re.compile(r"^[\w.]+(\(.*\))(\s*->\s*.+)?$")


def _public_members(module) -> list[tuple[str, object]]:
    """(name, object) of the module's public callables (only its ``__all__`` if it has one), sorted by name."""
    names = getattr(module, "__all__", None)
    members = vars(module)
    out = []
    for name in sorted(names if names is not None else members):
        obj = members.get(name)
        if name.startswith("_") or obj is None or inspect.ismodule(obj) or not callable(obj):
            continue
        out.append((name, obj))
    return out


def _candidates(module_name: str) -> list[tuple[str, object]]:
    """(qualified name, function) for the module's public functions, classes and their public methods."""
    out = []
    for name, obj in _public_members(importlib.import_module(module_name)):
        out.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                fn = getattr(member, "__func__", member)  # staticmethod / classmethod
                if not attr.startswith("_") and callable(fn):
                    out.append((f"{module_name}.{name}.{attr}", fn))
    return out


def key_and_query(qualname: str, obj) -> tuple[str, str] | None:
    """(``qualname(signature)``, cleaned docstring) or None (no docstring, or a short one).

    Without an ``inspect.signature``, a first docstring line that restates the call gives the signature (and
    leaves the query: the answer would be in the question); else the signature is ``(...)``. A leading
    ``self`` is left out.
    """
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    first, _, rest = doc.partition("\n")
    match = _SIG_LINE.match(first.strip())
    if match:
        if sig == "(...)":
            sig = match.group(1) + (match.group(2) or "")
        doc = rest.strip()
    sig = re.sub(r"^\(self(, /)?(, )?", "(", sig)
    if len(doc) < MIN_DOC:
        return None
    return f"{qualname}{sig}", doc


def search_dataset(modules=SEARCH_MODULES, seed: int = 0) -> list[tuple[str, str]]:
    """(key, query) pairs from the standard library, shuffled with ``seed``.

    Each object counts once (under the first module that exposes it); a docstring found more than once
    (inherited, shared by ``bytes`` and ``bytearray``, ...) is left out, as is a key found more than once,
    so that every query has exactly one right key.
    """
    seen: set[int] = set()
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                found = _candidates(module_name)
            except ImportError:  # a module this Python lacks
                continue
            for qualname, obj in found:
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                pair = key_and_query(qualname, obj)
                if pair is not None:
                    pairs.append(pair)
    pairs = unique_pairs(pairs)
    random.Random(seed).shuffle(pairs)
    return pairs


def unique_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs whose key and whose query each occur once, sorted."""
    keys, queries = {}, {}
    for k, q in pairs:
        keys[k] = keys.get(k, 0) + 1
        queries[q] = queries.get(q, 0) + 1
    return sorted((k, q) for k, q in pairs if keys[k] == 1 and queries[q] == 1)


def tokenize_pairs(tokenizer, pairs, seq: int) -> dict:
    """``input_ids`` / ``attention_mask`` of shape (n, 2, seq): row ``[i, 0]`` the query, ``[i, 1]`` the key."""
    q = tokenizer([query for _, query in pairs], padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
    k = tokenizer([key for key, _ in pairs], padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
    return {name: torch.stack([q[name], k[name]], dim=1) for name in ("input_ids", "attention_mask")}


class DualEncoder(nn.Module):
    """One encoder for queries and keys; mean pooling over the tokens, L2-normalised.

    ``forward(input_ids, attention_mask)`` takes (batch, 2, seq) pairs, runs the encoder once on the 2 x batch
    sequences and returns the in-batch-negatives loss: cross-entropy of ``scale`` x cosine similarity, each
    query against every key of the batch, its own key the label.
    """

    def __init__(self, encoder: nn.Module, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n, _, seq = input_ids.shape
        emb = self.embed(input_ids.transpose(0, 1).reshape(2 * n, seq),
                         attention_mask.transpose(0, 1).reshape(2 * n, seq))
        queries, keys = emb[:n], emb[n:]
        logits = self.scale * queries @ keys.T
        return nn.functional.cross_entropy(logits, torch.arange(n, device=logits.device))


def load_dual_encoder(path: str) -> DualEncoder:
    """The pretrained MiniLM encoder (no head: nothing is initialised at random) in a :class:`DualEncoder`."""
    from dropbp_fx.demo.data import quiet_transformers

    encoder = quiet_transformers().BertModel.from_pretrained(path, add_pooling_layer=False)
    return DualEncoder(encoder).train()


def recall_at_1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """The share of queries whose most similar key (dot product) is their own (row ``i`` of ``keys``).

    A tie with a wrong key counts as a miss.
    """
    scores = queries @ keys.T
    own = scores.diagonal()
    others = scores.clone()
    others.fill_diagonal_(-float("inf"))
    return float((own > others.max(dim=1).values).float().mean())


def evaluate_search(model: DualEncoder, tensors: dict, batch: int = 128) -> tuple[float, float]:
    """(recall@1, mean in-batch loss over the whole held-out set) in eval mode, under ``no_grad``."""
    was_training = model.training
    model.eval()
    emb = []
    with torch.no_grad():
        for side in (0, 1):
            ids, mask = tensors["input_ids"][:, side], tensors["attention_mask"][:, side]
            emb.append(torch.cat([model.embed(ids[i:i + batch], mask[i:i + batch])
                                  for i in range(0, len(ids), batch)]))
        queries, keys = emb
        loss = nn.functional.cross_entropy(model.scale * queries @ keys.T, torch.arange(len(queries)))
    model.train(was_training)
    return recall_at_1(queries, keys), float(loss)
