"""Stage 3, decoding: lossless EAGLE-2 tree speculative decoding over an HF causal LM.

Decoding uses the drafts (modules/draft/: their kinds and adapters); no draft file imports this folder.

    tree.py           dynamic draft trees: grow, rerank, attention masks, greedy acceptance
    sampling.py       speculative sampling along a tree (keeps the target's distribution exactly)
    tree_decoding.py  EagleDecoder: the draft/verify loop; make_adapter (a draft -> its kind's adapter)
    lookup.py         prompt lookup: a chain from the context grafted onto the draft tree (hybrid trees)
    parallel.py       ParallelDecoder: one draft forward proposes a block (P-EAGLE, DFlash); make_decoder
    hybrid.py         the hybrid rule: a prompt-lookup match of >= min_match tokens replaces a chain's K draft tokens
    proposals.py      proposals keyed by their context, logged and compared step by step (ours against vLLM's)
"""
