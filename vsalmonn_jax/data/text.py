"""Text side of an example: local tokenizer, the ChatML (Qwen "qwen_1_5") template, one media
placeholder, loss only on assistant tokens, and the truncation policy.

Layout: <|im_start|>system\\n{system}<|im_end|>\\n then per turn <|im_start|>{role}\\n{content}<|im_end|>\\n.
Assistant turns are targets from their first content token through their closing <|im_end|>
(the role header and the trailing newline are not). Truncation (`data.truncation`):
  "error"             a conversation longer than max_length raises, naming its length;
  "truncate_response" the LAST assistant turn is cut at the end (losing its <|im_end|>), never the
                      prompt; if the prompt alone does not fit, it raises.
`reserved` counts tokens that will be added later (e.g. media embeddings) in the budget.
Prompt formats (`data.prompt_format`): "clean" encodes the user turn `<media>\\n{prompt}` as one text
(one newline token after the media); "official" is the release's: `user\\n` + media + `\\n`, then the
text after the placeholder tokenised on its own (`"\\n" + prompt`: two newline tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("clean", "official")


RELEASE_PLACEHOLDER = "<image>"   # LLaVA's DEFAULT_IMAGE_TOKEN: the media place in the release's records


def load_tokenizer(path: str, placeholder: str | None = None):
    """A transformers tokenizer from a local directory (never downloads).

    With `placeholder`, a tokenizer that lacks it (e.g. the released Qwen2 one) gets it added as
    a special token; its id only has to index the embedding table, the model replaces it.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if placeholder:
        ids = tokenizer.convert_tokens_to_ids([placeholder])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            tokenizer.add_tokens([placeholder], special_tokens=True)
    return tokenizer


def token_id(tokenizer, token: str) -> int:
    """Id of a special token; a clear error when the tokenizer lacks it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"tokenizer has no token {token!r}")
    return int(ids[0])


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _official_user(tokenizer, content: str, placeholder: str, media_id: int,
                   newline: list[int]) -> list[int]:
    """The release's user content with the media: the placeholder moved to the front (as its
    preprocess_multimodal does), then media + "\\n" + the tokens of the text after the placeholder."""
    if not content.startswith(placeholder):
        content = f"{placeholder}\n{content.replace(placeholder, '').strip()}"
    return [media_id] + newline + _encode(tokenizer, content[len(placeholder):])


def encode_conversation(tokenizer, turns: Sequence[Mapping[str, str]], *, placeholder: str = "<media>",
                        has_media: bool = True, system: str | None = SYSTEM_PROMPT,
                        max_length: int | None = None, truncation: str = "error",
                        reserved: int = 0, add_generation_prompt: bool = False,
                        prompt_format: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """Turns [{"role", "content"}] -> (input_ids int32 [T], loss_mask bool [T]).

    With media, exactly one placeholder token must appear (none: one is put before the first
    user message; more than one: error; the release's `<image>` counts as one). Without media,
    none may appear.
    `add_generation_prompt` appends "<|im_start|>assistant\\n" (for captioning / sampling).
    `prompt_format` "official": the user turn holding the placeholder is encoded as the release
    does (module docstring).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    start, end = token_id(tokenizer, IM_START), token_id(tokenizer, IM_END)
    media_id = token_id(tokenizer, placeholder)
    newline = _encode(tokenizer, "\n")
    turns = [dict(t) for t in turns]
    for k, turn in enumerate(turns):
        if turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {k} must be {{'role': one of {ROLES}, 'content': str}}, got {turn!r}")
        if has_media and placeholder != RELEASE_PLACEHOLDER:   # the release's records write <image>
            turn["content"] = turn["content"].replace(RELEASE_PLACEHOLDER, placeholder)
    count = sum(t["content"].count(placeholder) for t in turns)
    if has_media and count == 0:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise ValueError("a conversation with media needs a user turn for the placeholder")
        first_user["content"] = f"{placeholder}\n{first_user['content']}"
    elif has_media and count > 1:
        raise ValueError(f"{count} media placeholders {placeholder!r}; exactly one is allowed")
    elif not has_media and count:
        raise ValueError(f"media placeholder {placeholder!r} in a conversation without media")
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    ids: list[int] = []
    mask: list[bool] = []

    def add(piece: list[int], target: bool) -> None:
        ids.extend(piece)
        mask.extend([target] * len(piece))

    if system is not None:
        add([start] + _encode(tokenizer, f"system\n{system}") + [end] + newline, False)
    last_response = None
    for turn in turns:
        add([start] + _encode(tokenizer, f"{turn['role']}\n"), False)
        if turn["role"] == "assistant":
            last_response = len(ids)
            add(_encode(tokenizer, turn["content"]) + [end], True)
            add(newline, False)
        elif prompt_format == "official" and placeholder in turn["content"]:
            add(_official_user(tokenizer, turn["content"], placeholder, media_id, newline)
                + [end] + newline, False)
        else:
            add(_encode(tokenizer, turn["content"]) + [end] + newline, False)
    if add_generation_prompt:
        add([start] + _encode(tokenizer, "assistant\n"), False)
    elif ids and ids[-len(newline):] == newline and turns and turns[-1]["role"] == "assistant":
        del ids[-len(newline):], mask[-len(newline):]   # a response ends at its <|im_end|>
    if has_media and ids.count(media_id) != 1:
        raise ValueError(f"placeholder {placeholder!r} must encode to exactly one token id "
                         f"{media_id}, found {ids.count(media_id)}")
    if max_length is not None and len(ids) + reserved > max_length:
        budget = max_length - reserved
        if truncation == "truncate_response" and last_response is not None and last_response < budget:
            ids, mask = ids[:budget], mask[:budget]
        elif truncation in ("error", "truncate_response"):
            raise ValueError(f"conversation is {len(ids)} tokens (+{reserved} reserved) > max_length "
                             f"{max_length} (truncation={truncation!r})")
        else:
            raise ValueError(f"data.truncation must be 'error' or 'truncate_response', got {truncation!r}")
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_prompt(tokenizer, user_text: str, **kwargs) -> np.ndarray:
    """A single user message ready for generation: ids ending with "<|im_start|>assistant\\n"."""
    ids, _ = encode_conversation(tokenizer, [{"role": "user", "content": user_text}],
                                 add_generation_prompt=True, **kwargs)
    return ids


def encode_response(tokenizer, user_text: str, response: str, ended: bool = True,
                    **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + one assistant response (DPO chosen / rejected / gt): (ids, loss_mask on response).
    `ended=False`: a sample that never stopped, without the closing <|im_end|> it never wrote."""
    ids, mask = encode_conversation(tokenizer, [{"role": "user", "content": user_text},
                                                {"role": "assistant", "content": response}], **kwargs)
    if not ended and len(ids) and ids[-1] == token_id(tokenizer, IM_END):
        ids, mask = ids[:-1], mask[:-1]
    return ids, mask


def mcq_prompt(question: str, options: list[str]) -> str:
    """The user text of a multiple-choice question (letters A, B, C, ...)."""
    lines = [question] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines + ["Answer with the option's letter."])


def mcq_answer(options: list[str], answer: int) -> str:
    return f"{chr(65 + answer)}. {options[answer]}"
