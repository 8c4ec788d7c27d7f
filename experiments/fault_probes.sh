#!/bin/bash
# Fault probes on the quick-start trainer (vlm_pretrain tiny, shrunk), one line each.
# usage: bash experiments/fault_probes.sh REPO OUTDIR   (REPO: a checkout, e.g. a git worktree of an older
# commit, to compare; its package must be importable from REPO; OUTDIR absolute). Results:
# experiments/results/fault_probes_cpu.md
REPO=$1; OUT=$2; rm -rf $OUT; mkdir -p $OUT; cd $REPO
DATA=${OUT%/}_data; mkdir -p $DATA
export JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=${OUT%/}_jit_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
BASE="--config=configs/vlm_pretrain.py:tiny --config.log_every=1 --config.eval_every=0 --config.data.data_dir=$DATA --config.data.batch_size=2 --config.data.seq_len=128 --config.data.sources.image.train_size=48 --config.data.sources.image.eval_size=8 --config.data.sources.text.train_size=24 --config.data.sources.text.eval_size=4 --config.data.tokenizer_vocab_size=1024 --config.measure_pipeline_batches=0"
run() { local wd=$1; shift; timeout 600 python -m glm5v_jax.main $BASE --workdir=$wd "$@" > $wd.log 2>&1; echo $?; }
ck() { ls $1/checkpoints 2>/dev/null | tr '\n' ' '; }
LR=""; for g in text vision projector; do LR="$LR --config.optim.groups.$g.lr=1e6 --config.optim.groups.$g.muon_lr=1e6"; done
python -c "import glm5v_jax; print('package', glm5v_jax.__file__)"
# P1 NaN
rc=$(run $OUT/nan --config.total_steps=12 --config.checkpoint_every=4 $LR)
nf=$(python - $OUT/nan <<'PY'
import sys, numpy as np, jax, orbax.checkpoint as ocp, pathlib
d = pathlib.Path(sys.argv[1]) / "checkpoints"; out = []
for s in sorted((p for p in d.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
    t = ocp.StandardCheckpointer().restore(s / "state")
    leaves = [np.asarray(x) for x in jax.tree.leaves(t) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    out.append(f"{s.name}:{sum(int((~np.isfinite(x)).any()) for x in leaves)}/{len(leaves)}")
print(" ".join(out))
PY
)
echo "P1 nan: exit $rc; checkpoints (step:nonfinite leaves/leaves) $nf; last line: $(tail -1 $OUT/nan.log | cut -c1-160)"
# base run
rc=$(run $OUT/base --config.total_steps=4 --config.checkpoint_every=2); echo "base: exit $rc, ckpts $(ck $OUT/base)"
# P2 incompatible change
cp -r $OUT/base $OUT/p2; rc=$(run $OUT/p2 --config.total_steps=8 --config.checkpoint_every=2 --config.model.backbone.embed_dim=128)
echo "P2 embed_dim change: exit $rc; ckpts $(ck $OUT/p2); $(grep -o 'resuming at step [0-9]*' $OUT/p2.log | head -1); last: $(tail -1 $OUT/p2.log | cut -c1-160)"
# P3 compatible change
cp -r $OUT/base $OUT/p3; rc=$(run $OUT/p3 --config.total_steps=6 --config.checkpoint_every=2 --config.optim.groups.text.lr=0.001)
echo "P3 total_steps+lr change: exit $rc; ckpts $(ck $OUT/p3); $(grep -o 'resuming at step [0-9]*' $OUT/p3.log | head -1)"
# P4 flipped byte
cp -r $OUT/base $OUT/p4; f=$(find $OUT/p4/checkpoints/4/state -path '*/d/*' -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
python -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=1; open(p,'wb').write(bytes(b))" $f
rc=$(run $OUT/p4 --config.total_steps=6 --config.checkpoint_every=2)
echo "P4 flipped byte in step 4: exit $rc; ckpts $(ck $OUT/p4); $(grep -o 'resuming at step [0-9]*' $OUT/p4.log | head -1); final loss $(grep -o '"loss": [0-9.naNinf]*' $OUT/p4/metrics.jsonl | tail -1)"
# P5 two runs together
( run $OUT/p5 --config.total_steps=4 --config.checkpoint_every=2 > $OUT/p5a.rc ) & ( sleep 0.2; timeout 600 python -m glm5v_jax.main $BASE --workdir=$OUT/p5 --config.total_steps=4 --config.checkpoint_every=2 > $OUT/p5b.log 2>&1; echo $? > $OUT/p5b.rc ) & wait
echo "P5 two runs together: exits $(cat $OUT/p5a.rc) $(cat $OUT/p5b.rc); ckpts $(ck $OUT/p5); b last: $(tail -1 $OUT/p5b.log | cut -c1-160)"
# P6 swapped tokenizer of the same padded size (the cached file replaced)
cp -r $OUT/base $OUT/p6; tok=$(ls $DATA/tokenizer_v1024_*.model); cp $tok $OUT/tok.bak
python -c "
from glm5v_jax.data import shapes_world; from glm5v_jax.data.tokenizer import train_tokenizer
t=[*shapes_world.iter_split_texts(0,'text_train',24),*shapes_world.iter_split_texts(0,'train',48)]
print(train_tokenizer(t,'$OUT/other.model',vocab_size=1000).padded_vocab_size)" >/dev/null
cp $OUT/other.model $tok; rc=$(run $OUT/p6 --config.total_steps=6 --config.checkpoint_every=2); cp $OUT/tok.bak $tok
echo "P6 swapped tokenizer: exit $rc; ckpts $(ck $OUT/p6); $(grep -o 'resuming at step [0-9]*' $OUT/p6.log | head -1); last: $(tail -1 $OUT/p6.log | cut -c1-160)"
# P7 partial metrics line, then resume
cp -r $OUT/base $OUT/p7; printf '{"step": 5, "loss": 1.2' >> $OUT/p7/metrics.jsonl; rc=$(run $OUT/p7 --config.total_steps=6 --config.checkpoint_every=2)
echo "P7 partial metrics line: exit $rc; last: $(tail -1 $OUT/p7.log | cut -c1-160)"
# P8 logs on resume: kill-like state (drop step 4 ckpt) then resume: steps logged twice?
cp -r $OUT/base $OUT/p8; rm -rf $OUT/p8/checkpoints/4; rc=$(run $OUT/p8 --config.total_steps=4 --config.checkpoint_every=2)
echo "P8 resume after losing step 4: exit $rc; loss rows per step: $(python -c "
import json,collections,sys; c=collections.Counter(json.loads(l)['step'] for l in open('$OUT/p8/metrics.jsonl') if l.strip() and 'loss\"' in l); print(dict(sorted(c.items())))")"
# P9 settings
for f in checkpoint_every=0 log_every=0 keep_checkpoints=0; do s=$(date +%s); rc=$(run $OUT/p9_${f%%=*} --config.total_steps=4 --config.$f); echo "P9 $f: exit $rc in $(( $(date +%s)-s ))s; ckpts $(ck $OUT/p9_${f%%=*}); last: $(tail -1 $OUT/p9_${f%%=*}.log | cut -c1-140)"; done
# P10 total_steps below the checkpoint
cp -r $OUT/base $OUT/p10; md5a=$(md5sum < $OUT/p10/config.json); rc=$(run $OUT/p10 --config.total_steps=2 --config.checkpoint_every=2)
echo "P10 total_steps=2 < step 4: exit $rc; config.json changed: $([ "$md5a" == "$(md5sum < $OUT/p10/config.json)" ] && echo no || echo yes); last: $(tail -1 $OUT/p10.log | cut -c1-140)"
