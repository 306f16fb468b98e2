"""Forward passes of the decode loop: prefill prompts into key/value caches, then step a left-padded batch.

`prefill(engine, rows)`: the prompts of `rows` (all as long, or one with a cached `prefix` `KV`, never written), image
features merged as the model's forward merges them, `engine.prefill_chunk` tokens at a time -> (last logits, a `KV` per
row). `KVBatch(model)`: rows decoding together in one left-padded kvcache.py cache. torch inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KV:
    """Key/value tensors of one prompt row: [(keys, values)] per layer, each [1, heads, length, dim]."""

    layers: list
    length: int

    def head(self, n: int) -> KV:
        return KV([(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in self.layers], n)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def _layers(cache) -> list:
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill(engine, rows: list) -> tuple:
    """(last logits [rows, vocab] float32, [KV per row]) for `rows`."""
    import torch

    from .kvcache import new_cache

    model = engine.model
    device = model.device
    prefix = rows[0].prefix
    start = prefix.length if prefix is not None else 0
    length = len(rows[0].ids)
    cache = new_cache(layers=prefix.layers) if prefix is not None else new_cache(model.config)  # prefix: only read
    with torch.inference_mode():
        ids = torch.tensor([row.ids[start:] for row in rows], device=device)
        embeds = model.get_input_embeddings()(ids)
        for k, row in enumerate(rows):
            if row.features is not None:
                merged = model.model.inputs_merger(input_ids=ids[k:k + 1], inputs_embeds=embeds[k:k + 1],
                                                   image_hidden_states=row.features)
                embeds[k] = merged[0]
        chunk = engine.prefill_chunk or length
        out = None
        for a in range(start, length, chunk):
            b = min(length, a + chunk)
            out = model(inputs_embeds=embeds[:, a - start:b - start],
                        attention_mask=torch.ones((len(rows), b), dtype=torch.long, device=device),
                        position_ids=torch.arange(a, b, device=device).expand(len(rows), -1), cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.cache
        layers = _layers(cache)
    if len(rows) == 1:
        return out.logits[:, -1].float(), [KV(layers, length)]
    return out.logits[:, -1].float(), [KV([(k[r:r + 1], v[r:r + 1]) for k, v in layers], length)
                                       for r in range(len(rows))]


class KVBatch:
    """Rows of several prompts decoding together: a left-padded cache, its attention mask and positions;
    `step(tokens)` -> next-token logits [rows, vocab] (float32)."""

    def __init__(self, model):
        self.model = model
        self.cache = None  # kvcache.new_cache, [rows, heads, width, dim] per layer
        self.mask = None  # [rows, width] long
        self.positions: list[int] = []  # next position of each row

    @property
    def rows(self) -> int:
        return len(self.positions)

    def add(self, kvs: list[KV]) -> None:
        """Append rows (prefilled prompts), padding them or the batch on the left to a common width."""
        import torch

        if not kvs:
            return
        parts = ([] if self.cache is None else [(_layers(self.cache), self.mask)])
        parts += [(kv.layers, torch.ones((1, kv.length), dtype=torch.long, device=kv.layers[0][0].device))
                  for kv in kvs]
        self.positions += [kv.length for kv in kvs]
        width = max(mask.shape[1] for _, mask in parts)
        rows = [(layers, r, mask.shape[1]) for layers, mask in parts for r in range(mask.shape[0])]
        self.cache = _copied(rows, width)
        self.mask = torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); left columns that no kept row uses are dropped."""
        if not rows:
            self.cache, self.mask, self.positions = None, None, []
            return
        mask = self.mask[rows]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        self.mask = mask[:, first:]
        layers, width = _layers(self.cache), self.mask.shape[1]
        self.cache = _copied([(layers, r, width) for r in rows], width)
        self.positions = [self.positions[r] for r in rows]

    def step(self, tokens: list[int]):
        """Feed one token per row; returns the next-token logits [rows, vocab] (float32)."""
        import torch

        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long, device=device)], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[t] for t in tokens], device=device), attention_mask=self.mask,
                             position_ids=torch.tensor([[p] for p in self.positions], device=device),
                             cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:, -1].float()


def _copied(rows: list, width: int):
    """A cache owning new buffers (with spare room) holding `rows` [(layers, row, n)], each row's last `n`
    positions right-aligned to `width` and zeros before."""
    from .kvcache import SPARE, owned_cache

    buffers = []
    for i in range(len(rows[0][0])):
        k0, v0 = rows[0][0][i]
        keys = k0.new_zeros((len(rows), k0.shape[1], width + SPARE, k0.shape[3]))
        values = v0.new_zeros((len(rows), v0.shape[1], width + SPARE, v0.shape[3]))
        for j, (layers, r, n) in enumerate(rows):
            k, v = layers[i]
            keys[j, :, width - n:width] = k[r, :, k.shape[2] - n:]
            values[j, :, width - n:width] = v[r, :, v.shape[2] - n:]
        buffers.append((keys, values))
    return owned_cache(buffers, width)
