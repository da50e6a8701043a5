"""Greedy generation with timings: the package's main job.

  python -m experiments.generate --prompt "What is the capital of France?" --chat

Prints the generated text, then time to first token, median ms per output token,
tokens/s and the achieved weight-read bandwidth per device, and writes a record
(experiments/results/generate/).
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from experiments import records
from models import factory
from models.decode import Decoder
from models.sharding import make_mesh
from models.tokenizer import Tokenizer

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Preset name (models/config.py).")
_CHECKPOINT = flags.DEFINE_string("checkpoint_dir", None, "A HF LlamaForCausalLM directory.")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "Prompt text.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap the prompt in the model's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
_TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel degree (first tp local devices).")
_LOOP = flags.DEFINE_enum("loop", "jit", ["python", "jit"], "Decode loop.")
_BACKEND = flags.DEFINE_string("backend", "xla", "All-reduce backend (models/collectives.py).")
_MATMUL = flags.DEFINE_string("matmul", "xla", "Projections: XLA's dots or the Pallas GEMV"
                              " (models/llama.MATMULS).")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "KV cache slots per sequence.")
_RECORD = flags.DEFINE_bool("record", True, "Write a record under experiments/results/.")


def main(argv):
  del argv
  mesh = make_mesh(_TP.value)
  config, graphdef, state, ckpt = factory.build(_MODEL.value, mesh, _CHECKPOINT.value)
  if ckpt is None:
    raise app.UsageError(f"--model {_MODEL.value} has no tokenizer; pass --checkpoint_dir")
  tok = Tokenizer(ckpt)
  ids = tok.chat(_PROMPT.value) if _CHAT.value else tok.encode(_PROMPT.value)
  decoder = Decoder(config, graphdef, state, mesh, backend=_BACKEND.value, max_len=_MAX_LEN.value,
                    matmul=_MATMUL.value)
  decoder.generate([ids], _MAX_NEW.value, loop=_LOOP.value)  # compile and warm up
  gen = decoder.generate([ids], _MAX_NEW.value, loop=_LOOP.value)
  row = gen.tokens[0]
  n_out = int(np.argmax(row == config.eos_token_id)) + 1 if (row == config.eos_token_id).any() else len(row)
  text = tok.decode(row[:n_out])
  step_ms = np.array(gen.steps_s) * 1e3
  median_ms = float(np.median(step_ms)) if step_ms.size else float("nan")
  gbps = config.weight_bytes / _TP.value / (median_ms * 1e-3) / 1e9
  print(text)
  print(f"\ntime to first token   {gen.prefill_s * 1e3:9.2f} ms ({len(ids)} prompt tokens)")
  print(f"per output token      {median_ms:9.2f} ms median over {step_ms.size} steps")
  print(f"throughput            {1e3 / median_ms:9.1f} tokens/s")
  print(f"weight reads          {gbps:9.1f} GB/s per device")
  if _RECORD.value:
    result = {"model": _MODEL.value, "tp": _TP.value, "loop": _LOOP.value, "backend": _BACKEND.value,
              "matmul": _MATMUL.value,
              "prompt_tokens": len(ids), "output_tokens": n_out, "ttft_ms": gen.prefill_s * 1e3,
              "tokens_per_s": 1e3 / median_ms, "weight_gbps_per_device": gbps,
              **(records.summarize(step_ms, "tpot_ms_") if step_ms.size else {})}
    config_rec = {"model": _MODEL.value, "checkpoint": bool(_CHECKPOINT.value), "chat": _CHAT.value,
                  "prompt": _PROMPT.value, "max_new_tokens": _MAX_NEW.value, "max_len": _MAX_LEN.value,
                  "dtype": str(np.dtype(config.dtype))}
    path = records.write("generate", config_rec, [result], extra={"text": text})
    print(f"record: {path}")


if __name__ == "__main__":
  app.run(main)
