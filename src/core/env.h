// Environment variables that switch a path for measurement or A/B runs
// (QMOE_PDL=0, QMOE_PREFILL_TILES=128, ...). Each caller reads its variable
// once, into a function-local static.
#pragma once

#include <cstdlib>
#include <cstring>

namespace qmoe {

// Whether `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// A forcing switch: 0 where `name` is "0", 1 where it is "1", else -1 (the
// automatic choice).
inline int env_switch(const char* name) { return env_is(name, "0") ? 0 : env_is(name, "1") ? 1 : -1; }

// The integer value of `name`, `unset` where it is unset.
inline int env_int(const char* name, int unset = 0) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : unset;
}

}  // namespace qmoe
