# Pidfiles that survive their process (a CI machine killed mid-run, a reboot of the sandbox)
# must never stop another process that was later given the same pid: sourced by
# scripts/services.sh and the e2e scripts.
#
#   pid_save FILE PID    record PID with its start time
#   pid_ours FILE [DIR]  print the pid in FILE if that very process still runs: same start
#                        time, or (a pidfile a server wrote itself, holding only the pid) a
#                        process whose working directory or command line names DIR

# Start time of process PID in clock ticks since boot (field 22 of /proc/PID/stat; the command
# name before it may hold spaces, so count from the closing parenthesis), or nothing.
pid_start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  set -- $stat
  echo "${20:-}"
}

pid_save() {
  echo "$2 $(pid_start_time "$2")" >"$1"
}

pid_ours() {
  local file="$1" dir="${2:-}" pid start
  [ -f "$file" ] || return 0
  read -r pid start <"$file" || true
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  if [ -n "${start:-}" ]; then
    [ "$(pid_start_time "$pid")" = "$start" ] && echo "$pid"
  elif [ -n "$dir" ]; then
    local cmdline
    cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true) "
    # DIR itself or a path under it, never a sibling that merely starts with the same name.
    if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir" ]; then
      echo "$pid"
    else
      case "$cmdline" in *"$dir/"* | *"$dir "*) echo "$pid" ;; esac
    fi
  fi
  return 0
}
