# Which source files make the library, by folder, so that the layout of the
# tree is the layout of the build. Files in src/cpu/simd/ are compiled once
# per instruction-set level, chosen by their suffix, and picked at run time.
file(GLOB QMOE_CORE_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/core/*.cpp)
list(FILTER QMOE_CORE_SOURCES EXCLUDE REGEX "no_cuda\\.cpp$")
file(GLOB QMOE_CPU_SOURCES CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/src/cpu/*.cpp ${PROJECT_SOURCE_DIR}/src/cpu/simd/*.cpp)
set(QMOE_SOURCES ${QMOE_CORE_SOURCES} ${QMOE_CPU_SOURCES})

# The AVX-512 level also holds the AMX prefill (used only where the CPU and
# the OS offer it, amx_ready), where the compiler knows the AMX intrinsics.
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag("-mamx-tile -mamx-bf16" QMOE_COMPILER_HAS_AMX)
set(QMOE_AMX OFF)
if(QMOE_COMPILER_HAS_AMX AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
  set(QMOE_AMX ON)  # (the benchmark's AMX anchor too)
endif()
foreach(f IN LISTS QMOE_CPU_SOURCES)
  if(f MATCHES "_avx2\\.cpp$")
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  elseif(f MATCHES "_avx512\\.cpp$")
    set(opts "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512bf16;-mavx512vnni;-mfma;-mf16c")
    if(QMOE_AMX)
      list(APPEND opts "-mamx-tile;-mamx-bf16")
      set_source_files_properties(${f} PROPERTIES COMPILE_DEFINITIONS QMOE_AMX=1)
    endif()
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "${opts}")
  endif()
endforeach()

if(QMOE_CUDA)
  file(GLOB QMOE_CUDA_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/*.cu)
  list(APPEND QMOE_SOURCES ${QMOE_CUDA_SOURCES})
else()
  list(APPEND QMOE_SOURCES ${PROJECT_SOURCE_DIR}/src/core/no_cuda.cpp)
endif()
