#!/usr/bin/env bash
# Dump levels and compression against gcore on the demo target; prints one line per run.
#   cargo build --release -p coreflect-cli
#   bash crates/coreflect-bench/levels.sh                 # 256 MiB target, 3 runs
#   MIB=1024 RUNS=5 ONLY=zstd bash crates/coreflect-bench/levels.sh
# wall = seconds for the whole command; apparent/disk = the file's length / blocks in KiB;
# user/sys = CPU seconds of coreflect (and its warden). Figures, not tests.
set -u
B=${B:-target/release/coreflect}; MIB=${MIB:-256}; RUNS=${RUNS:-3}; ONLY=${ONLY:-all}
D=$(mktemp -d /tmp/coreflect-levels.XXXXXX)
exec 3< <(sleep 100000)
"$B" __target --heap-mib "$MIB" <&3 >"$D/ready" &
TP=$!
trap 'kill $TP 2>/dev/null; rm -rf "$D"' EXIT
while ! grep -q READY "$D/ready" 2>/dev/null; do sleep 0.2; done
run() { # name file command...
  local name=$1 f=$2; shift 2
  /usr/bin/time -o "$D/t" -f "wall=%e user=%U sys=%S" "$@" >/dev/null 2>&1
  echo "$name run=$r $(cat "$D/t") apparent_kib=$(du -k --apparent-size $f | cut -f1) disk_kib=$(du -k $f | cut -f1)"
  rm -f $f
}
for r in $(seq "$RUNS"); do
  if [ "$ONLY" = all ]; then
    for l in mini default full; do run "coreflect-$l" "$D/$l.core" "$B" dump $TP -q --level $l -o "$D/$l.core"; done
    run coreflect-stdout "$D/s.core" sh -c "$B dump $TP -q -o - > $D/s.core"
    run gcore "$D/g.*" gcore -o "$D/g" $TP
    run gcore-a "$D/g.*" gcore -a -o "$D/g" $TP
  fi
  run coreflect-plain "$D/p.core" "$B" dump $TP -q -o "$D/p.core"
  run coreflect-zstd "$D/z.core.zst" "$B" dump $TP -q --compress zstd -o "$D/z.core.zst"
done
