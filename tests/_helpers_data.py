"""Local tokenizers with the chat templates of the three families (no hub access)."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a poem about the sea. The sea is wide and deep and blue.",
    "Explain speculative decoding: a small draft proposes tokens and the target verifies them.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? . , : ; ' \" ( ) [ ] { } < > / \\ - _ + = * # @",
] * 4

# ChatML as SmolLM2/Qwen ship it (with a default system prompt when none is given).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 Instruct: headers in special tokens, content trimmed, <|eot_id|> closes every turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-2 chat: [INST] as plain text, system folded into the first user turn, replies end with </s>.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Mistral v0.3 style: [INST] special tokens, the system prompt moved into the LAST user turn.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.index0 == loop_messages|length - 2 and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

FAMILIES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, False),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, False),
    "llama2": (LLAMA2, ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}, True),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], {"bos_token": "<s>", "eos_token": "</s>"}, True),
}


def tiny_tokenizer(family: str, vocab_size: int = 300):
    """A small BPE tokenizer (byte-level, or sentencepiece-like Metaspace for the [INST] families)
    trained on a few sentences, with the family's special tokens and chat template."""
    template, specials, named, metaspace = FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None, byte_fallback=False))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(CORPUS) + "\n"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"] + specials,
                                      initial_alphabet=alphabet)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.chat_template = template
    return fast


def tiny_target_dir(path, family: str = "chatml", hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = True):
    """Save a tiny random Llama + a local tokenizer into `path` (a folder load_target accepts).
    tie=False: a separate random LM head (a tied random model's greedy replies repeat the prompt's
    last token, a newline for ChatML, so they decode to nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(family)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def chat_rows(n: int, seed: int = 0):
    """n ShareGPT-style rows of varied lengths (some multi-turn), built from the corpus sentences."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 3):
            turns.append({"from": "human", "value": rng.choice(CORPUS[:5]).split(".")[0]})
            turns.append({"from": "gpt", "value": " ".join(rng.choices(CORPUS[:5], k=1 + rng.randrange(3)))})
        rows.append({"id": str(i), "conversations": turns})
    return rows
