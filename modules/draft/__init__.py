"""Stage 2, the draft models: one file per architecture, one registry that decides the kind.

    kinds.py          the registry (KINDS) and DraftKind, the interface every architecture implements
    adapter.py        DraftAdapter: the draft protocol of the decoders (modules/decode/); each kind implements it
    eagle_draft.py    EAGLE-1/2: fc(cat(embedding, feature)) -> one decoder layer -> the target's LM head
    eagle3_draft.py   EAGLE-3: fused aux-layer features, own draft vocabulary, training-time test
    peagle_draft.py   P-EAGLE: EAGLE-3 + a learned mask_hidden and a mask token, K tokens in one forward
    dflash_draft.py   DFlash: Qwen3-style layers filling a block of masked positions (non-causal)
    ttt_attention.py  the training-time-test attention both drafts use when trained with TTT
    vocab.py          EAGLE-3 draft vocabulary (most frequent trained tokens) and its id maps
    loading.py        load any saved draft folder; the registry decides its kind
    export_check.py   is an export complete? its weights against the tensors its kind's config needs
Add an architecture: docs/extending.md.
"""
