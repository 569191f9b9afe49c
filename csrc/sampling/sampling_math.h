// The math of reparameterised sampling (Kingma & Welling 2014, eq. 10 and appendix B), shared by
// the CPU and CUDA kernels. Written with explicit fma so both devices round identically.
#pragma once

#include "common/hostdevice.h"
#include "common/portable_math.h"

namespace gk {

// z = mu + sigma * eps with sigma = exp(logvar / 2).
template <class C>
GK_HD C reparameterized(C mu, C logvar, C eps) {
  return fma(exp(C(0.5) * logvar), eps, mu);
}

// KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1 - log sigma^2) / 2.
template <class C>
GK_HD C gaussian_kl_term(C mu, C logvar) {
  return C(0.5) * ((fma(mu, mu, exp(logvar)) - C(1)) - logvar);
}

}  // namespace gk
