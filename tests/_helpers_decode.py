"""Test helpers for the tree decoder: reference greedy decoding, oracle and self drafts."""
import pytest
import torch

from modules.draft.adapter import DraftAdapter
from modules.kv_cache import TreeKVCache


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: threading costs more than it saves, and the 2 CI cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plain_greedy(target, prompt, max_new_tokens, eos_token_id=None):
    """HF greedy decoding, new tokens only (the reference the decoder must match)."""
    ids = torch.as_tensor(prompt).reshape(1, -1)
    out = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                          pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


class OracleAdapter(DraftAdapter):
    """Proposes the target's greedy sequence `seq` (prompt + continuation) with certainty.

    The draft input at position p is (feature p, token p+1) and predicts token p+2; the 'hidden'
    it returns just carries the position so that logprobs() can look the answer up.
    """

    def __init__(self, seq, vocab_size):
        self.seq = list(seq)
        self.vocab_size = vocab_size

    def new_cache(self, capacity):
        return TreeKVCache(1, capacity)

    def forward(self, input_ids, features, position_ids, attention_mask, cache):
        return position_ids.to(torch.float64).unsqueeze(-1).expand(*position_ids.shape, 2).clone()

    def logprobs(self, hidden):
        pos = hidden[..., 0].long()
        lp = torch.full((*pos.shape, self.vocab_size), -20.0)
        nxt = pos + 2
        ok = nxt < len(self.seq)
        tok = torch.tensor([self.seq[i] if i < len(self.seq) else 0 for i in nxt.reshape(-1).tolist()])
        lp.reshape(-1, self.vocab_size)[torch.arange(tok.numel()), tok.reshape(-1)] = torch.where(
            ok.reshape(-1), 0.0, -20.0)
        return lp


class SelfDraftAdapter(DraftAdapter):
    """The target itself as a draft (a strong, imperfect draft for tests).

    The draft sees token p+1 at position p, so it runs the target without the prompt's first
    token: its proposals are close to, but not exactly, the target's.
    """

    def __init__(self, target):
        self.target = target

    def new_cache(self, capacity):
        return TreeKVCache(self.target.config.num_hidden_layers, capacity)

    def forward(self, input_ids, features, position_ids, attention_mask, cache):
        return self.target.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True).last_hidden_state

    def logprobs(self, hidden):
        return torch.log_softmax(self.target.lm_head(hidden).float(), dim=-1)
