/* The pod sandbox's process for the end-to-end node: holds the pod's namespaces open, reaps
 * orphaned children (it is PID 1 when the pod shares its process namespace) and exits on
 * SIGINT or SIGTERM. Built statically; the only file in the e2e pause image. */
#include <signal.h>
#include <sys/wait.h>

int main(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGCHLD);
  sigprocmask(SIG_BLOCK, &set, 0);
  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGCHLD) {
      while (waitpid(-1, 0, WNOHANG) > 0) {}
      continue;
    }
    return 0;
  }
}
