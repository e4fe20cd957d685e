#include "quant_support.hpp"
