# The public-only ABI: the shared library's dynamic symbol table must list
# exactly the functions the header declares with M3S_API, nothing internal
# (src/core, src/cpu, src/cuda helpers and kernels are hidden).
# cmake -DNM=<nm> -DLIB=<libm3sparse.so> -DHEADER=<m3sparse.h> -P check_exports.cmake
execute_process(COMMAND ${NM} -D --defined-only ${LIB}
  OUTPUT_VARIABLE nm_out RESULT_VARIABLE nm_rc)
if(NOT nm_rc EQUAL 0)
  message(FATAL_ERROR "abi_exports: '${NM} -D --defined-only ${LIB}' failed (${nm_rc})")
endif()
string(REGEX MATCHALL "[ \t][A-Za-z][ \t]+[^ \t\r\n]+" rows "${nm_out}")
set(exported)
foreach(row IN LISTS rows)
  string(REGEX REPLACE "^[ \t][A-Za-z][ \t]+" "" sym "${row}")
  # the linker's own section markers, in some binutils versions
  if(NOT sym MATCHES "^(_init|_fini|_edata|_end|__bss_start)$")
    list(APPEND exported ${sym})
  endif()
endforeach()

file(READ ${HEADER} header)
string(REGEX MATCHALL "M3S_API[^;(]*[ *](m3s_[a-z0-9_]+)\\(" decls "${header}")
set(declared)
foreach(d IN LISTS decls)
  string(REGEX REPLACE ".*[ *](m3s_[a-z0-9_]+)\\($" "\\1" name "${d}")
  list(APPEND declared ${name})
endforeach()

list(REMOVE_DUPLICATES exported)
list(REMOVE_DUPLICATES declared)
set(extra ${exported})
list(REMOVE_ITEM extra ${declared})
set(missing ${declared})
list(REMOVE_ITEM missing ${exported})
list(LENGTH exported n_exp)
list(LENGTH declared n_decl)
if(extra OR missing)
  message(FATAL_ERROR "abi_exports: ${LIB} exports ${n_exp} symbols, the header declares "
                      "${n_decl} functions.\n  exported but not in the header: ${extra}\n"
                      "  in the header but not exported: ${missing}")
endif()
message(STATUS "abi_exports: ${n_exp} exported symbols == the header's ${n_decl} functions")
