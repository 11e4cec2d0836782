# Sanitizer and fuzzing builds, driven by the options of the top-level CMakeLists.txt
# (`make sanitize`, `make fuzz`; README "Sanitizers and fuzzing").

if(M1_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "M1_FUZZ needs clang for libFuzzer: configure with -DCMAKE_CXX_COMPILER=clang++")
  endif()
  # Fuzzing finds memory errors only if they fault, so the fuzz targets always run sanitized.
  if(NOT M1_SANITIZE)
    set(M1_SANITIZE address,undefined)
  endif()
  # Coverage hooks everywhere; libFuzzer's main() is linked into the fuzz targets alone.
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()

if(M1_SANITIZE)
  # A report must fail the run, not scroll past: no recovery after the first error. Frame
  # pointers keep the reports' stacks whole. The libstdc++ assertions add the bounds checks
  # ASan cannot make (operator[] past size() but within a vector's capacity, std::span).
  add_compile_options(-fsanitize=${M1_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer
                      -D_GLIBCXX_ASSERTIONS)
  add_link_options(-fsanitize=${M1_SANITIZE})
endif()
