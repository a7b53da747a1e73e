#include "engine/runtime/random_state.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#if defined(LORAD_WITH_CUDA)
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace lorad::engine {

RandomState RandomState::Capture(bool with_cuda) {
  RandomState s;
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    s.cpu = cpu.get_state();
  }
#if defined(LORAD_WITH_CUDA)
  if (with_cuda) {
    s.cuda_device = c10::cuda::current_device();
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(s.cuda_device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.cuda = gen.get_state();
  }
#else
  (void)with_cuda;
#endif
  return s;
}

void RandomState::Restore() const {
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(this->cpu);
  }
#if defined(LORAD_WITH_CUDA)
  if (cuda_device >= 0) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(cuda_device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cuda);
  }
#endif
}

}  // namespace lorad::engine
