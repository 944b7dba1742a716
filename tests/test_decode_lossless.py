"""The tree decoder is lossless: greedy output == plain greedy, sampling keeps the distribution."""
import pytest
import torch
from tests._helpers_decode import OracleAdapter, SelfDraftAdapter, one_thread, plain_greedy  # noqa: F401
from tests._helpers_eagle import tiny_target

from modules.draft.eagle_draft import EagleDraft
from modules.decode.tree_decoding import EagleDecoder


def tiny_pair(family="llama", seed=0, **overrides):
    """Tiny random target (float64: batched and sequential numerics agree) + random EagleDraft."""
    target = tiny_target(family, seed=seed, **overrides).double()
    torch.manual_seed(seed + 1)
    draft = EagleDraft.from_target(target).double().eval()
    return target, draft


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", [(12, 4, 3), (1, 3, 2), (6, 1, 5), (30, 5, 4)])
def test_random_draft_greedy_equals_plain_greedy(family, shape):
    total, depth, k = shape
    target, draft = tiny_pair(family)
    prompt = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(3))
    ref = plain_greedy(target, prompt, 40)
    res = EagleDecoder(target, draft, total_tokens=total, depth=depth, top_k=k).generate(prompt, 40)
    assert res.tokens == ref
    assert 1.0 <= res.tau < 1.5  # a random draft is almost never right
    assert sum(res.accept_lengths) == len(ref) - 1  # every token but the prefill one came from a cycle


def test_eager_attention_target():
    target, draft = tiny_pair("llama")
    target.set_attn_implementation("eager")
    assert target.config._attn_implementation == "eager"
    prompt = torch.arange(5, 25)
    ref = plain_greedy(target, prompt, 30)
    assert EagleDecoder(target, draft, total_tokens=10, depth=3, top_k=3).generate(prompt, 30).tokens == ref


def oracle_for(target, prompt, n_new, eos=None):
    cont = plain_greedy(target, prompt, n_new, eos_token_id=eos)
    return cont, OracleAdapter(prompt.tolist() + cont, target.config.vocab_size)


@pytest.mark.parametrize("depth,k,total", [(4, 1, 5), (5, 3, 20), (3, 4, 8)])
def test_oracle_draft_reaches_depth_plus_one(depth, k, total):
    target, _ = tiny_pair("qwen2")
    prompt = torch.arange(30, 50)
    cont, oracle = oracle_for(target, prompt, 60)
    res = EagleDecoder(target, oracle, total_tokens=total, depth=depth, top_k=k).generate(prompt, 60)
    assert res.tokens == cont
    # Every cycle accepts all `depth` draft tokens plus the bonus token.
    assert res.accept_lengths[:-1] == [depth + 1] * (res.cycles - 1)
    assert res.tau > depth  # the last cycle may be cut by max_new_tokens


def test_eos_inside_the_tree_stops_there():
    target, _ = tiny_pair("llama")
    prompt = torch.arange(60, 75)
    free = plain_greedy(target, prompt, 40)
    eos = free[7]  # a token the target emits mid-sequence (first occurrence decides)
    cont, oracle = oracle_for(target, prompt, 40, eos=eos)
    assert cont[-1] == eos and len(cont) < 40
    res = EagleDecoder(target, oracle, total_tokens=10, depth=5, top_k=2).generate(prompt, 40, eos_token_id=eos)
    assert res.tokens == cont
    # A random draft too, and a list of EOS ids.
    target, draft = tiny_pair("llama")
    res = EagleDecoder(target, draft, total_tokens=10, depth=4, top_k=3).generate(prompt, 40, eos_token_id=[eos, 299])
    assert res.tokens == cont


def test_context_limits():
    target, draft = tiny_pair("llama", max_position_embeddings=64)
    dec = EagleDecoder(target, draft, total_tokens=8, depth=4, top_k=2)
    with pytest.raises(ValueError, match="context"):
        dec.generate(torch.arange(64), 10)
    # Close to the end: the tree shrinks and generation stops at the context length.
    prompt = torch.arange(50, 110) % 300
    ref = plain_greedy(target, prompt, 4)
    cont, oracle = oracle_for(target, prompt, 4)
    res = EagleDecoder(target, oracle, total_tokens=8, depth=4, top_k=2).generate(prompt, 100)
    assert res.tokens == ref and len(res.tokens) == 4


def test_mismatched_draft_is_a_clear_error(tmp_path):
    target, _ = tiny_pair("llama")
    other = tiny_target("llama", hidden_size=32, vocab_size=200)
    draft = EagleDraft.from_target(other)
    with pytest.raises(ValueError, match="hidden size 32 vs target 64.*vocab 200 vs target 300"):
        EagleDecoder(target, draft)
    from modules.draft.loading import load_draft
    with pytest.raises(FileNotFoundError, match="no draft config"):
        load_draft(tmp_path, target)


def test_sampling_keeps_the_target_distribution():
    """Speculative sampling vs the exact marginals of tokens 1-3 of the target (temperature 1)."""
    V = 10
    target, draft = tiny_pair("llama", vocab_size=V)
    with torch.no_grad():
        target.lm_head.weight.mul_(25.0)  # peaked distributions: the draft's top-k is often right
    prompt = torch.tensor([1, 4, 7, 2])
    # Exact marginals by enumerating all 1- and 2-token continuations.
    with torch.no_grad():
        p1 = torch.softmax(target(prompt[None]).logits[0, -1], -1)
        seq1 = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2_given = torch.softmax(target(seq1).logits[:, -1], -1)
        p2 = p1 @ p2_given
        seq2 = torch.cat([seq1.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3_given = torch.softmax(target(seq2).logits[:, -1], -1)
        p3 = (p1[:, None] * p2_given).reshape(-1) @ p3_given
    # A strong draft (the target itself, one token short) so that the tree walk accepts often.
    dec = EagleDecoder(target, SelfDraftAdapter(target), total_tokens=8, depth=3, top_k=2, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    N = 600
    samples, cycles = [], 0
    for _ in range(N):
        res = dec.generate(prompt, 3, generator=g)
        samples.append(res.tokens)
        cycles += res.cycles
    samples = torch.tensor(samples)
    assert cycles < 1.5 * N  # 2 tokens after the prefill one: mostly one cycle, so drafts were accepted
    from tests.test_decode_tree import chi2_pvalue
    for i, p in enumerate([p1, p2, p3]):
        counts = torch.bincount(samples[:, i], minlength=V).float()
        assert chi2_pvalue(counts, p.float()) > 1e-3, (i, counts / N, p)
    # The random EagleDraft is lossless too (acceptance rarely happens, rejection paths run).
    dec = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2, temperature=1.0)
    samples = torch.tensor([dec.generate(prompt, 2, generator=g).tokens for _ in range(300)])
    for i, p in enumerate([p1, p2]):
        counts = torch.bincount(samples[:, i], minlength=V).float()
        assert chi2_pvalue(counts, p.float()) > 1e-3, (i, counts / 300, p)


def test_draft_vocab_subset_is_still_lossless():
    from modules.draft.eagle_draft import Eagle2Adapter

    target, draft = tiny_pair("qwen2")
    prompt = torch.arange(100, 120)
    ref = plain_greedy(target, prompt, 30)
    adapter = Eagle2Adapter(draft, vocab_ids=torch.arange(0, 300, 3))
    lp = adapter.logprobs(torch.randn(2, 64, dtype=torch.float64))
    assert lp.shape == (2, 100) and torch.allclose(lp.exp().sum(-1), torch.ones(2))
    assert adapter.to_target_ids(torch.tensor([0, 5])).tolist() == [0, 15]
    res = EagleDecoder(target, adapter, total_tokens=10, depth=3, top_k=3).generate(prompt, 30)
    assert res.tokens == ref


def test_smollm2_greedy_is_lossless(smollm2):
    """The embedded SmolLM2 (fp32) with a draft: the trained one in outputs/eagle2 when present,
    else a random EagleDraft. Output == HF greedy; a trained draft must also be accepted."""
    from benchmark.bench_eagle import resolve_draft_dir
    from modules.draft.loading import load_draft
    from modules.paths import DEFAULT_TRAIN_DIR

    target, tokenizer = smollm2
    trained = resolve_draft_dir(DEFAULT_TRAIN_DIR)
    if trained:
        draft = load_draft(trained, target_model=target).eval()
    else:
        torch.manual_seed(0)
        draft = EagleDraft.from_target(target).eval()
    messages = [{"role": "user", "content": "List three facts about the Moon."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = torch.tensor(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ref = plain_greedy(target, prompt, 16, eos_token_id=tokenizer.eos_token_id)
    res = EagleDecoder(target, draft, total_tokens=10, depth=4, top_k=3).generate(
        prompt, 16, eos_token_id=tokenizer.eos_token_id)
    assert res.tokens == ref
    if trained:
        assert res.tau > 1.3, f"trained draft in {trained} is rarely accepted (tau {res.tau:.2f})"


def test_adapter_asking_for_aux_layers_gets_the_target_hidden_states():
    """The EAGLE-3 path of the protocol: aux_layers makes the decoder hand over all hidden states."""
    from modules.draft.eagle_draft import Eagle2Adapter

    target, draft = tiny_pair("llama")
    seen = []

    class AuxAdapter(Eagle2Adapter):
        aux_layers = [0, 1, 2]

        def target_features(self, last_hidden, hidden_states):
            fused = torch.cat([hidden_states[i] for i in self.aux_layers], dim=-1)
            seen.append((len(hidden_states), tuple(fused.shape)))
            return last_hidden  # an EAGLE-3 adapter would return fc(fused)

    prompt = torch.arange(3, 20)
    ref = plain_greedy(target, prompt, 12)
    assert EagleDecoder(target, AuxAdapter(draft), total_tokens=6, depth=3, top_k=2).generate(prompt, 12).tokens == ref
    assert seen and all(n == 3 and shape[-1] == 3 * 64 for n, shape in seen)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", [(12, 4, 3), (1, 3, 2), (6, 1, 5)])
def test_hybrid_tree_with_lookup_branch_is_lossless_and_accepts_more(family, shape):
    """A prompt-lookup branch grafted onto the tree (modules/decode/lookup.py): same output as plain
    greedy, and on a target that repeats itself (tiny random models loop) far more tokens per cycle
    than the random draft alone."""
    total, depth, k = shape
    target, draft = tiny_pair(family)
    prompt = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(3))
    ref = plain_greedy(target, prompt, 60)
    alone = EagleDecoder(target, draft, total_tokens=total, depth=depth, top_k=k).generate(prompt, 60)
    hybrid = EagleDecoder(target, draft, total_tokens=total, depth=depth, top_k=k, lookup_tokens=8).generate(prompt, 60)
    assert hybrid.tokens == alone.tokens == ref
    assert sum(hybrid.accept_lengths) == len(ref) - 1
    assert hybrid.tau > alone.tau + 0.4, (hybrid.tau, alone.tau)


def test_hybrid_tree_at_the_context_end_and_with_sampling():
    target, draft = tiny_pair("llama", max_position_embeddings=48)
    prompt = torch.randint(0, 300, (17,), generator=torch.Generator().manual_seed(4))
    ref = plain_greedy(target, prompt, 48 - 17)  # the decoder stops at the context length
    res = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2, lookup_tokens=10).generate(prompt, 100)
    assert res.tokens == ref and len(ref) == 48 - 17
    with pytest.raises(ValueError, match="greedy"):
        EagleDecoder(target, draft, temperature=0.7, lookup_tokens=4)
