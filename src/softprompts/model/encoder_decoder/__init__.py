"""The encoder-decoder family (``AutoModelForSeq2SeqLM``: T5, BART, ...): ``EncoderDecoderBase`` and, inside this
package, the encoder and decoder forwards with an artifact (``forward``), its decode loop (``batch``) and its
teacher-forced scores (``score``). Code outside ``model/`` asks the family; only this face is imported from above."""

from softprompts.model.encoder_decoder.base import EncoderDecoderBase

__all__ = ["EncoderDecoderBase"]
