// Umbrella header: every policy and the cache. Includes no CUDA header.
#pragma once

#include "backend/cpu.hpp"
#include "cache.hpp"
#include "concepts.hpp"
#include "config.hpp"
#include "error.hpp"
#include "eviction/full.hpp"
#include "eviction/sparse.hpp"
#include "eviction/window.hpp"
#include "grouping/heads.hpp"
#include "half.hpp"
#include "memory.hpp"
#include "precision/floating.hpp"
#include "rope.hpp"
#include "storage/contiguous.hpp"
#include "storage/paged.hpp"
#include "tensor.hpp"
