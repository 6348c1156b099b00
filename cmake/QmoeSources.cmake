# Which source files make the library, by folder, so that the layout of the
# tree is the layout of the build. Files in src/cpu/simd/ are compiled once
# per instruction-set level, chosen by their suffix, and picked at run time.
file(GLOB QMOE_CORE_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/core/*.cpp)
list(FILTER QMOE_CORE_SOURCES EXCLUDE REGEX "no_cuda\\.cpp$")
file(GLOB QMOE_CPU_SOURCES CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/src/cpu/*.cpp ${PROJECT_SOURCE_DIR}/src/cpu/simd/*.cpp)
set(QMOE_SOURCES ${QMOE_CORE_SOURCES} ${QMOE_CPU_SOURCES})

foreach(f IN LISTS QMOE_CPU_SOURCES)
  if(f MATCHES "_avx2\\.cpp$")
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  elseif(f MATCHES "_avx512\\.cpp$")
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS
      "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512bf16;-mavx512vnni;-mfma;-mf16c")
  endif()
endforeach()

if(QMOE_CUDA)
  file(GLOB QMOE_CUDA_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/*.cu)
  list(APPEND QMOE_SOURCES ${QMOE_CUDA_SOURCES})
else()
  list(APPEND QMOE_SOURCES ${PROJECT_SOURCE_DIR}/src/core/no_cuda.cpp)
endif()
