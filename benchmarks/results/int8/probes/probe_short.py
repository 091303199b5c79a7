import sys, numpy as np, torch, torch.nn.functional as F
exec(open(__file__.replace("probe_short", "probe_speech")).read().split('print("verification batch')[0])
test = [e for e in held_out("synthetic:100") if e.audio is not None][:12]
for sec in (0.1, 0.25, 0.5, 1.0, 2.0):
    ds, cs = [], []
    for e in test:
        a = e.audio[: int(sec * 16000)]
        if len(a) < int(sec * 16000): continue
        bb = model_batch(b, tok, [Utterance(a, e.transcript, e.speaker, e.context)])
        r1 = z(bb, a32, f32); q1 = z(bb, a8, f8)
        ds.append(float((q1 - r1).abs().max())); cs.append(float(F.cosine_similarity(q1, r1)))
    print(f"speech cut to {sec}s: n={len(ds)} max|dz| max {max(ds):.4f} median {np.median(ds):.4f} cos min {min(cs):.4f}")
