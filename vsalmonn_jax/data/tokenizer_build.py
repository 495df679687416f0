"""Building a small byte-level BPE tokenizer offline from a text corpus, with the ChatML special tokens.

Saved as a `transformers` PreTrainedTokenizerFast directory (`AutoTokenizer.from_pretrained(path)`).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], out_dir: str, vocab_size: int = 512,
                    placeholder: str = "<media>"):
    """Train BPE on `corpus`, add the special tokens, save to `out_dir`; returns the HF tokenizer.

    Special token ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, placeholder 3; the whole
    vocabulary (256 bytes + merges + specials) is at most `vocab_size`.
    """
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END, placeholder]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens > vocab_size {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        bos_token=None, additional_special_tokens=[IM_START, IM_END, placeholder])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast
