"""Numbers and strings fixed by the models we interoperate with (OpenAI CLIP, LLaVA), defined once.

LLaVA's own values live in `llava.constants`; they are repeated here so that code which only builds prompts or
labels does not need llava-torch installed (tests/mllm_bridge check they stay equal to LLaVA's).
"""

# OpenAI CLIP's image normalisation (its preprocessing, and every CLIP image processor derived from it).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' CLIP text model pools the token at argmax(input_ids) (OpenAI's end-of-text is the highest id)
# when a config says eos_token_id == 2, the value of configs written before it pooled at the real end-of-text id.
LEGACY_ARGMAX_EOS_ID = 2

IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX: label positions the loss skips (torch's cross-entropy default)
IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX: the input id LLaVA replaces by the image features
IMAGE_TOKEN = "<image>"  # llava.constants.DEFAULT_IMAGE_TOKEN: where a prompt's image goes
