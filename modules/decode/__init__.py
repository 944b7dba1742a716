"""Stage 3, decoding: lossless EAGLE-2 tree speculative decoding over an HF causal LM.

    tree.py           dynamic draft trees: grow, rerank, attention masks, greedy acceptance
    sampling.py       speculative sampling along a tree (keeps the target's distribution exactly)
    tree_decoding.py  EagleDecoder: the draft/verify loop, the KV cache, the per-kind draft adapters
    parallel.py       ParallelDecoder: one draft forward proposes a block (P-EAGLE, DFlash); make_decoder
"""
