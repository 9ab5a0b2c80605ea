#!/bin/bash
# A stand-in for the docker CLI in the ssh-backend tests (no Docker daemon in CI): just the verbs
# the container job script uses. A "container" is a process in its own session, NOT inheriting the
# caller's file descriptors (like a real container started by dockerd), with state in $FAKE_DOCKER_STATE.
S=${FAKE_DOCKER_STATE:?}; mkdir -p "$S"
echo "$*" >> "$S/calls"
alive() { [ -f "$S/$1.pid" ] && kill -0 "$(cat "$S/$1.pid")" 2>/dev/null; }
verb=$1; shift
case "$verb" in
  run)
    name=; envs=(); entry=
    while [ $# -gt 0 ]; do
      case "$1" in
        -d) shift ;;
        --name) name=$2; shift 2 ;;
        -e) envs+=("$2"); shift 2 ;;
        --entrypoint) entry=$2; shift 2 ;;
        --gpus|-v|--label|--shm-size) shift 2 ;;
        -*) shift ;;
        *) break ;;
      esac
    done
    image=$1; shift
    [ -e "$S/$name.pid" ] && { echo "Conflict. The container name \"/$name\" is already in use" >&2; exit 125; }
    : > "$S/$name.log"
    ( for kv in "${envs[@]}"; do export "$kv"; done
      exec setsid bash -c '"$@" >>"$0.log" 2>&1; echo $? >"$0.exit"' "$S/$name" "$entry" "$@" ) \
      </dev/null >/dev/null 2>&1 9>&- 8>&- &
    echo $! > "$S/$name.pid"
    echo "fakecontainerid-$name" ;;
  container) [ "$1" = inspect ] && [ -f "$S/$2.pid" ] ;;
  image) [ "$1" = inspect ] ;;
  logs)
    [ "$1" = -f ] && shift
    exec tail -c +1 -f --pid="$(cat "$S/$1.pid")" "$S/$1.log" ;;
  wait)
    while alive "$1"; do sleep 0.05; done
    for _ in $(seq 20); do [ -f "$S/$1.exit" ] && break; sleep 0.05; done
    cat "$S/$1.exit" ;;
  stop)
    [ "$1" = -t ] && shift 2
    alive "$1" && kill -TERM -- "-$(cat "$S/$1.pid")"
    while alive "$1"; do sleep 0.05; done ;;
  inspect) name=${*: -1}; cat "$S/$name.exit" 2>/dev/null || echo 137 ;;
  rm)
    [ "$1" = -f ] && { shift; alive "$1" && kill -KILL -- "-$(cat "$S/$1.pid")"; }
    rm -f "$S/$1.pid" "$S/$1.exit" "$S/$1.log" ;;
  *) echo "fake docker: unsupported verb $verb" >&2; exit 1 ;;
esac
