/* Linked only into the profiling build of cross/hot-profile, never into a
 * shipped binary. -Zinstrument-mcount makes every Rust function call
 * mcount() on entry; this one records the caller's address once, in a
 * table that cross/hot-profile reads from the running agent through
 * /proc/PID/mem. The table is a lock-free open-addressing set: threads
 * race only on CAS, and the agent calls far fewer distinct functions
 * than it has slots. */
#include <stdint.h>

#define SLOTS (1u << 20)

uintptr_t flotilla_hot_seen[SLOTS];

__attribute__((no_instrument_function)) void mcount(void) {
  uintptr_t ra = (uintptr_t)__builtin_return_address(0);
  uintptr_t h = (uintptr_t)((ra * 0x9E3779B97F4A7C15ull) >> 44) & (SLOTS - 1);
  for (;;) {
    uintptr_t cur = __atomic_load_n(&flotilla_hot_seen[h], __ATOMIC_RELAXED);
    if (cur == ra) return;
    if (cur == 0) {
      uintptr_t expected = 0;
      if (__atomic_compare_exchange_n(&flotilla_hot_seen[h], &expected, ra, 0,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED) ||
          expected == ra)
        return;
    }
    h = (h + 1) & (SLOTS - 1);
  }
}
