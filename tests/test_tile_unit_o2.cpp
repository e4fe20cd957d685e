// The tile-unit kernels built at -O2, as most users' release builds are (the
// other tests build at -O3). GCC 12's AMX intrinsics declare too little of
// their memory effects: _tile_loadconfig names 8 bytes of the 64-byte
// configuration, and at -O2 the stores of the tile shapes were dropped as
// dead, so the first tile load raised SIGILL; tile loads and stores name only
// their address. kernels/cpu/amx.hpp now states those effects itself. This
// runs int8 decode (AMX-INT8) and fp16 prefill (AMX-BF16) against the float64
// reference.
#include "test_attention.hpp"

using namespace kvcache;

TEST_CASE("tile-unit kernels built at -O2 equal float64 attention", "[amx]") {
  kvtest::check_attention<cache<gqa<128>, contiguous, full, int8_kv<>>>(8, 2, 128);
  kvtest::check_attention<cache<gqa<128>, contiguous, full, fp16>>(8, 2, 128);
}
