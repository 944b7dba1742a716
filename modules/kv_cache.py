"""The KV cache of our decoders (target and draft): preallocated buffers, truncation and in-place compaction.

HF's DynamicCache copies the whole cache each token (torch.cat); TreeKVCache writes into buffers sized once
per generate() call, and drops a draft tree's rejected entries by moving the accepted ones down (`compact`).
Used by modules/decode/ (the target's cache) and by every draft adapter's `new_cache` (modules/draft/).
"""
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """A DynamicLayer writing into a preallocated [B, H, capacity, D] buffer.

    No torch.cat per step (HF's DynamicLayer copies the whole cache each token), and the tree's
    rejected entries are dropped by moving the accepted ones down (`compact`).
    """

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self.kbuf = key_states.new_zeros(b, h, self.capacity, dk)
        self.vbuf = value_states.new_zeros(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True
        self._set_views()

    def _set_views(self):
        self.keys = self.kbuf[:, :, :self.length]
        self.values = self.vbuf[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def truncate(self, length):
        self.length = min(self.length, length)
        if self.is_initialized:
            self._set_views()

    def crop(self, tokens_to_remove):
        # Negative = remove that many; positive = keep that many (transformers' legacy meaning).
        self.truncate(self.length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove)

    def compact(self, start, keep):
        """Keep entries start + keep (ascending) at start.., drop everything after them."""
        n = keep.shape[0]
        src = (keep + start).to(self.kbuf.device)  # a spread target keeps each layer's cache on its own GPU
        self.kbuf[:, :, start:start + n] = self.kbuf.index_select(2, src)
        self.vbuf[:, :, start:start + n] = self.vbuf.index_select(2, src)
        self.length = start + n
        self._set_views()

    def reset(self):
        self.length = 0
        if self.is_initialized:
            self._set_views()


class TreeKVCache(DynamicCache):
    """A DynamicCache (what HF models and EagleDraft expect) made of BufferedLayers."""

    def __init__(self, num_layers, capacity):
        Cache.__init__(self, layers=[BufferedLayer(capacity) for _ in range(num_layers)])

    def truncate(self, length):
        for layer in self.layers:
            layer.truncate(length)

    def compact(self, start, keep):
        for layer in self.layers:
            layer.compact(start, keep)
