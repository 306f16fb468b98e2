"""Key/value caches and the forward passes over them: prefill prompts, then step a left-padded batch in place.

`new_cache(config=None, layers=None, spare=SPARE)`: a `DynamicCache` of append-only [batch, heads, capacity, dim]
buffers (a full one grows `spare` longer; an adopted tensor is never written, so a cached prefix is only read).
`prefill(engine, rows)`: prompts of one length, or one with a cached `prefix` `KV`, image features merged as the model
does, `engine.prefill_chunk` tokens at a time -> (last logits, a `KV` per row). `KVBatch(model)` steps rows together.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SPARE = 128  # positions a buffer keeps beyond what it holds when it grows


def _adopt(tensor):
    """A tensor assigned from outside as [buffer, end]: full, so never written in place."""
    if tensor is None:
        return None
    return [tensor, tensor.shape[-2] if tensor.dim() > 1 else 0]  # 1-d: DynamicLayer's first empties


def _view(slot):
    if slot is None:
        return None
    buffer, end = slot
    return buffer if end == buffer.shape[-2] else buffer[:, :, :end]


def _append(slot, new, spare: int):
    """Write `new` after the filled part of `slot` (in place while there is room); the filled part's view."""
    buffer, end = slot
    n = new.shape[-2]
    if buffer.shape[-2] < end + n:
        grown = new.new_empty((*new.shape[:-2], end + n + spare, new.shape[-1]))
        if end:
            grown[:, :, :end] = buffer[:, :, :end]
        buffer = grown
    buffer[:, :, end:end + n] = new
    slot[:] = [buffer, end + n]
    return buffer[:, :, :end + n]


@functools.cache
def room_layer():
    """`DynamicLayer` writing in place (the class, made once)."""
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        """`.keys`/`.values` are views of append-only buffers."""

        def __init__(self, *args, spare: int = SPARE, **kwargs):
            self.spare = spare
            super().__init__(*args, **kwargs)

        keys = property(lambda self: _view(self._k), lambda self, tensor: setattr(self, "_k", _adopt(tensor)))
        values = property(lambda self: _view(self._v), lambda self, tensor: setattr(self, "_v", _adopt(tensor)))

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)  # device; 1-d empties
            self.keys = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
            self.values = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return _append(self._k, key_states, self.spare), _append(self._v, value_states, self.spare)

        def get_seq_length(self) -> int:
            return self._k[1] if self.is_initialized and self._k is not None else 0

        def drop(self, n: int) -> None:
            """Forget the first `n` positions (views of the same buffers, still written in place)."""
            self._k = [self._k[0][:, :, n:], self._k[1] - n]
            self._v = [self._v[0][:, :, n:], self._v[1] - n]

    return RoomLayer


def new_cache(config=None, layers=None, spare: int = SPARE):
    """A `DynamicCache` of in-place layers keeping every position: for `config`'s decoder (a sliding window is the
    attention mask's to apply, as in KVBatch's steps), or over `layers` [(keys, values)], adopted."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if config is not None:  # the families' decoders (Mistral, Llama) have attention layers only
        n = config.get_text_config(decoder=True).num_hidden_layers
        cache.layers = [room_layer()(spare=spare) for _ in range(n)]
    else:
        cache.layers = []
        for keys, values in layers:
            layer = room_layer()(spare=spare)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values  # adopted: copied at the first update, never written
            cache.layers.append(layer)
    cache.layer_class_to_replicate = None
    return cache


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
    return out.logits[:, -1].float(), [KV([(k[r:r + 1], v[r:r + 1]) for k, v in layers], length)
                                       for r in range(len(rows))]


class KVBatch:
    """Rows of several prompts decoding together in the slots of a left-padded cache (its attention mask and
    positions per slot); `step(tokens)` -> next-token logits [rows, vocab] (float32). A row that leaves frees its
    slot; a row that joins and fits the batch's width is written into a free slot, and the batch is copied only when
    it must grow, or before a step with slots no row took."""

    def __init__(self, model):
        self.model = model
        self.cache = None  # kvcache.new_cache, [slots, heads, width, dim] per layer
        self.mask = None  # [slots, width] long
        self.positions: list[int] = []  # next position of each slot
        self.slots: list[int] = []  # the slot of each row, in row order

    @property
    def rows(self) -> int:
        return len(self.slots)

    def add(self, kvs: list[KV]) -> None:
        """Append rows (prefilled prompts); the `kvs` are used up (their layers emptied as they are copied)."""
        if not kvs:
            return
        free = [] if self.mask is None else sorted(set(range(self.mask.shape[0])) - set(self.slots))
        if len(kvs) <= len(free) and all(kv.length <= self.mask.shape[1] for kv in kvs):
            for slot, kv in zip(free, kvs):
                self._write(slot, kv)
            self.slots += free[:len(kvs)]
            self._trim()
            return
        import torch

        parts = ([] if self.cache is None else [(_layers(self.cache), self.slots, self.mask[self.slots])])
        parts += [(kv.layers, [0], torch.ones((1, kv.length), dtype=torch.long, device=kv.layers[0][0].device))
                  for kv in kvs]
        self.positions = [self.positions[s] for s in self.slots] + [kv.length for kv in kvs]
        width = max(mask.shape[1] for _, _, mask in parts)
        self.cache = _copied([(layers, r, mask.shape[1]) for layers, slots, mask in parts for r in slots], width)
        self.mask = torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for _, _, mask in parts])
        self.slots = list(range(len(self.positions)))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); the others' slots are free."""
        self.slots = [self.slots[r] for r in rows]
        if not rows:
            self.cache, self.mask, self.positions = None, None, []

    def step(self, tokens: list[int]):
        """Feed one token per row; returns the next-token logits [rows, vocab] (float32)."""
        import torch

        if len(self.slots) < self.mask.shape[0]:  # slots no row took: copy the batch smaller
            self._compact()
        device = self.mask.device
        order = None if self.slots == sorted(self.slots) else self.slots  # rows in other slots than their own
        fed = list(tokens)
        for row, slot in enumerate(order or ()):
            fed[slot] = tokens[row]
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long, device=device)], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[t] for t in fed], device=device), attention_mask=self.mask,
                             position_ids=torch.tensor([[p] for p in self.positions], device=device),
                             cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.positions = [p + 1 for p in self.positions]
        logits = out.logits[:, -1].float()
        return logits if order is None else logits[order]

    def _write(self, slot: int, kv: KV) -> None:
        """The row `kv` into `slot`, right-aligned to the batch's width, zeros before it."""
        import torch

        width, n = self.mask.shape[1], kv.length
        with torch.inference_mode():  # a buffer grown in a step is an inference tensor
            for i, (layer, (k, v)) in enumerate(zip(self.cache.layers, kv.layers)):
                for into, new in ((layer.keys, k), (layer.values, v)):
                    into[slot, :, :width - n] = 0
                    into[slot, :, width - n:] = new[0, :, new.shape[2] - n:]
                kv.layers[i] = None
            self.mask[slot] = 0
            self.mask[slot, width - n:] = 1
        self.positions[slot] = n

    def _trim(self) -> None:
        """Drop the left columns that no slot uses (views: nothing is copied)."""
        first = int(self.mask.any(dim=0).nonzero()[0])
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.drop(first)

    def _compact(self) -> None:
        """The rows alone, in row order, in a new cache without the left columns no row uses."""
        mask = self.mask[self.slots]
        self.mask = mask[:, int(mask.any(dim=0).nonzero()[0]):]  # every row has its prompt's positions
        layers, width = _layers(self.cache), self.mask.shape[1]
        self.cache = _copied([(layers, r, width) for r in self.slots], width)
        self.positions = [self.positions[s] for s in self.slots]
        self.slots = list(range(len(self.slots)))


def _copied(rows: list, width: int):
    """A cache of new buffers (with spare room) holding `rows` [(layers, row, n)]: each row's last `n` positions
    right-aligned to `width`, zeros before. Each `layers` list is emptied (None) layer by layer as it is copied."""
    buffers = []
    for i in range(len(rows[0][0])):
        k0, v0 = rows[0][0][i]
        keys = k0.new_zeros((len(rows), k0.shape[1], width + SPARE, k0.shape[3]))
        values = v0.new_zeros((len(rows), v0.shape[1], width + SPARE, v0.shape[3]))
        k0 = v0 = None
        for j, (layers, r, n) in enumerate(rows):
            k, v = layers[i]
            keys[j, :, width - n:width] = k[r, :, k.shape[2] - n:]
            values[j, :, width - n:width] = v[r, :, v.shape[2] - n:]
        k = v = None
        for layers, _, _ in rows:
            layers[i] = None
        buffers.append((keys, values))
    cache = new_cache(layers=[(k[:, :, :width], v[:, :, :width]) for k, v in buffers])
    for layer, (k, v) in zip(cache.layers, buffers):
        layer._k, layer._v = [k, width], [v, width]
    return cache
