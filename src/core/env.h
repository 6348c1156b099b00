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

// The integer value of `name`, `unset` where it is unset.
inline int env_int(const char* name, int unset = 0) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : unset;
}

}  // namespace qmoe
