"""Embedding deviation of the int8 graphs vs fp32: verification (noise) batch vs held-out speech."""
import sys, numpy as np, torch
from emoq_serve.bundle import Bundle
from emoq_serve import bundle as names
from emoq_serve.executors.inputs import model_batch, text_only, text_tokenizer
from emoq_serve.executors.heads import load_heads
from emoq_serve.executors.openvino import OvStage
from emoq_serve.executors.ort import OrtStage
from emoq_serve.executors.types import Utterance
from emoq_serve.kernels.dispatch import attentive_pool
from export.verify import verification_examples
from export.quantize import held_out
import torch.nn.functional as F

b = Bundle.open(sys.argv[1], verify_hashes=False)
tok = text_tokenizer(b); pool_u, _ = load_heads(b)
a32 = OrtStage(b.file(names.AUDIO_ENCODER_ONNX), 2); f32 = OrtStage(b.file(names.FORMER_ONNX), 2)
a8 = OvStage(b.file(names.AUDIO_ENCODER_ONNX), 2, "int8"); f8 = OvStage(b.file(names.FORMER_ONNX), 2, "int8")
abf = OvStage(b.file(names.AUDIO_ENCODER_ONNX), 2, "bfloat16"); fbf = OvStage(b.file(names.FORMER_ONNX), 2, "bfloat16")

def z(batch, a, f):
    out = a.run(waveforms=batch["waveforms"], lengths=batch["lengths"])
    st = f.run(frames=out["frames"].clone(), frame_mask=text_only(b, out["frame_mask"]).clone(),
               input_ids=batch["input_ids"], text_mask=batch["text_mask"])["query_states"].clone()
    return attentive_pool(st.float(), pool_u)

def dev(examples, per_utt):
    groups = [[e] for e in examples] if per_utt else [examples]
    res = {k: [] for k in ("audio8", "former8", "both8", "bf16")}
    for g in groups:
        utt = [Utterance(np.zeros(0, np.float32) if e.audio is None else e.audio, e.transcript, e.speaker, e.context) for e in g]
        batch = model_batch(b, tok, utt)
        ref = z(batch, a32, f32)
        for k, (a, f) in {"audio8": (a8, f32), "former8": (a32, f8), "both8": (a8, f8), "bf16": (abf, fbf)}.items():
            zz = z(batch, a, f)
            res[k].append(((zz - ref).abs().amax(dim=1), F.cosine_similarity(zz, ref, dim=1)))
    for k, v in res.items():
        m = torch.cat([x[0] for x in v]); c = torch.cat([x[1] for x in v])
        print(f"  {k:8s} max|dz| max {m.max():.4f} median {m.median():.4f}  cos min {c.min():.5f} median {c.median():.5f}")

print("verification batch (noise clips, padded):"); dev(verification_examples(), False)
test = [e for e in held_out(sys.argv[2] if len(sys.argv) > 2 else "synthetic:100") if e.audio is not None][:40]
print(f"held-out speech, {len(test)} clips one at a time:"); dev(test, True)
print("per row of the verification batch (audio8, both8):")
ex = verification_examples()
utt = [Utterance(np.zeros(0, np.float32) if e.audio is None else e.audio, e.transcript, e.speaker, e.context) for e in ex]
batch = model_batch(b, tok, utt); ref = z(batch, a32, f32)
for k, (a, f) in {"audio8": (a8, f32), "both8": (a8, f8)}.items():
    zz = z(batch, a, f)
    for e, d, c in zip(ex, (zz - ref).abs().amax(1), F.cosine_similarity(zz, ref, dim=1)):
        print(f"  {k} {e.id:10s} audio {0 if e.audio is None else len(e.audio)/16000:.1f}s  max|dz| {d:.4f} cos {c:.4f}")
for e in ex:
    if e.audio is None: continue
    utt1 = [Utterance(e.audio, e.transcript, e.speaker, e.context)]
    bb = model_batch(b, tok, utt1); r1 = z(bb, a32, f32); q1 = z(bb, a8, f8)
    print(f"  alone {e.id:10s} max|dz| {(q1-r1).abs().max():.4f} cos {F.cosine_similarity(q1, r1).item():.4f}")
