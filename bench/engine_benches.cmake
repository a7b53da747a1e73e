# Engine benchmarks for the GPU machine (not tests): each runs lorad's engine on a model folder and
# prints tokens/s and peak memory; bench/run_engine_bench_on_device.sh puts the transformers/PEFT
# baseline beside them. Included from the root CMakeLists.txt with -DLORAD_ENGINE_BENCH=ON.
foreach(bench trainer_bench generation_bench)
  add_executable(${bench} ${PROJECT_SOURCE_DIR}/bench/${bench}.cpp)
  # libtorch is PRIVATE to lorad_engine, but these include llama_model.h (torch) themselves.
  target_link_libraries(${bench} PRIVATE lorad_engine ${TORCH_LIBRARIES} absl::status
                                         absl::statusor absl::strings)
  target_compile_options(${bench} PRIVATE ${LORAD_WARNINGS})
  # gpu_stats.h calls the CUDA caching allocator (libc10_cuda) itself: name the library rather
  # than rely on it coming through the torch target.
  if(C10_CUDA_LIBRARY)
    target_link_libraries(${bench} PRIVATE ${C10_CUDA_LIBRARY})
  endif()
endforeach()

# engine_gpu_test: the Engine's GPU loop on a CUDA device (tests/gpu/engine_gpu_test.cpp), when
# GoogleTest is found (tests/gpu/run_engine_gpu_test.sh passes GTest_DIR).
find_package(GTest QUIET)
if(GTest_FOUND)
  add_executable(engine_gpu_test ${PROJECT_SOURCE_DIR}/tests/gpu/engine_gpu_test.cpp)
  # It includes llama_model.h (torch) itself, as the benchmarks do.
  target_link_libraries(engine_gpu_test PRIVATE lorad_engine ${TORCH_LIBRARIES} GTest::gtest
                                                GTest::gtest_main absl::status absl::statusor)
  target_compile_options(engine_gpu_test PRIVATE ${LORAD_WARNINGS})
endif()
