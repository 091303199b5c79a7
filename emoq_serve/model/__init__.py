"""The bundled PyTorch model: frozen HuBERT, the EmoQ-Former, heads, losses and the LLM side.

Submodules are imported directly (`emoq_serve.model.former`, ...) so that light users such as
the prompt builder do not pull in the whole model stack: `audio_encoder` (HuBERT),
`feature_cache` (its frozen features on disk), `text_init` (the former from a pretrained text
encoder), `former` (the EmoQ-Former and attentive pooling), `heads` (the stage-1 auxiliary head),
`projector` (soft tokens for the LLM), `prompt` (the chat prompt and the emotion-word tokens),
`llm` (loading the LLM, LoRA, posteriors), `emoq` (the stage-1 model), `stage2` (the LLM stage),
`losses` (focal, SupCon, MAL).
"""
