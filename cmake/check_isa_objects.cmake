# ctest isa_objects_share_no_inline_code: cmake -DOBJECTS="a.o;b.o" -P check_isa_objects.cmake
#
# Each CPU instruction set is its own translation unit, compiled with that set's -m flags. An
# inline function of a shared header that the compiler emits out of line there is a weak (COMDAT)
# symbol, and the linker keeps one copy for every caller: an AVX-512 build of it could be called
# from the AVX2 or scalar path and fault on a CPU without AVX-512. So the ISA objects must define
# no weak symbol of int4kit's own (headers meant for them use internal linkage, as act_quant.h).
# With -DPROBE=ON the script instead expects to find one (the test that the check can fail).
find_program(NM nm REQUIRED)
if(NOT OBJECTS)
  message(FATAL_ERROR "no object files given")
endif()
set(found "")
foreach(obj IN LISTS OBJECTS)
  if(NOT EXISTS ${obj})
    message(FATAL_ERROR "missing object file ${obj}")
  endif()
  execute_process(COMMAND ${NM} -C ${obj} OUTPUT_VARIABLE symbols COMMAND_ERROR_IS_FATAL ANY)
  string(REPLACE "\n" ";" lines "${symbols}")
  foreach(line IN LISTS lines)
    if(line MATCHES "^[0-9a-f]* [WV] .*int4kit::")
      list(APPEND found "${obj}: ${line}")
    endif()
  endforeach()
endforeach()
if(PROBE)
  if(NOT found)
    message(FATAL_ERROR "the probe's out-of-line inline function was not found: the check is blind")
  endif()
elseif(found)
  string(REPLACE ";" "\n  " found "${found}")
  message(FATAL_ERROR "ISA objects define int4kit inline code out of line (weak symbols):\n  ${found}")
endif()
